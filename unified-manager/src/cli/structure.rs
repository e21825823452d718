//! `hotpatch prune` and `hotpatch tensor rename|remove`: rewrites that change the tensor
//! table.

use std::path::PathBuf;

use anyhow::bail;
use byte_tier::MappedFile;
use byte_tier::edit::{prune_layers, remove_tensor, rename_tensor};
use serde_json::json;

use super::meta::{Output, note_archived, print_rewrite, rewrite};

/// Arguments of `hotpatch prune`.
#[derive(Debug, clap::Args)]
pub struct PruneArgs {
    /// The file.
    pub file: PathBuf,
    /// The blocks to remove, comma-separated (0-based): 3,7,8.
    #[arg(long, value_delimiter = ',', required = true)]
    pub layers: Vec<u64>,
    #[command(flatten)]
    pub output: Output,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn prune(args: &PruneArgs) -> anyhow::Result<()> {
    if args.output.dry_run {
        let map = MappedFile::open(&args.file)?;
        let gguf = map.parse()?;
        let mut writer = byte_tier::GgufWriter::from_gguf(&gguf);
        let report = prune_layers(&gguf, &mut writer, &args.layers)?;
        let layout = writer.layout()?;
        println!(
            "dry run: would remove {} tensors, renumber {}, trim {:?}, blocks {} -> {}, size {} -> {} bytes",
            report.tensors_removed.len(),
            report.tensors_renamed.len(),
            report.arrays_trimmed,
            report.blocks_before,
            report.blocks_after,
            gguf.file_len(),
            layout.file_len
        );
        return Ok(());
    }
    let outcome = rewrite(&args.file, &args.output, |gguf, writer| {
        prune_layers(gguf, writer, &args.layers)
    })?;
    let report = &outcome.result;
    if args.json {
        println!(
            "{}",
            json!({"output": outcome.output, "blocks_before": report.blocks_before, "blocks_after": report.blocks_after,
                "tensors_removed": report.tensors_removed, "tensors_renamed": report.tensors_renamed,
                "arrays_trimmed": report.arrays_trimmed, "bytes_before": outcome.input_len, "bytes_after": outcome.bytes_written})
        );
    } else {
        println!(
            "pruned layers {:?}: blocks {} -> {}, {} tensors removed, {} renumbered, per-layer arrays trimmed: {}",
            args.layers,
            report.blocks_before,
            report.blocks_after,
            report.tensors_removed.len(),
            report.tensors_renamed.len(),
            if report.arrays_trimmed.is_empty() {
                "none".to_owned()
            } else {
                report.arrays_trimmed.join(", ")
            }
        );
        print_rewrite("", &outcome);
    }
    note_archived(outcome.archived_journal.as_deref());
    Ok(())
}

/// A structural tensor command.
#[derive(Debug, clap::Subcommand)]
pub enum StructureCommand {
    /// Rename a tensor (a rewrite).
    Rename {
        /// The file.
        file: PathBuf,
        /// The current name.
        from: String,
        /// The new name.
        to: String,
        #[command(flatten)]
        output: Output,
    },
    /// Write a tensor's dequantized values to a float32 .npy with the GGUF shape.
    Export {
        /// The file.
        file: PathBuf,
        /// The tensor.
        name: String,
        /// The .npy to write.
        #[arg(short = 'o', long = "output", value_name = "OUT.npy")]
        output: PathBuf,
        /// Say what would be written and write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Replace a tensor's values from a .npy of its shape (quantized to its type), in
    /// place through the journal.
    Import {
        /// The file.
        file: PathBuf,
        /// The tensor.
        name: String,
        /// The .npy to read (float16, float32 or float64).
        input: PathBuf,
        /// Say what would change and write nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Convert the tensors whose names match a regular expression to another type (a
    /// rewrite).
    Requantize(RequantizeArgs),
    /// Add a tensor of another model (rope_freqs, an MTP / nextn head) with a shape
    /// check, keeping its type (a rewrite of DST).
    Copy {
        /// The model to take the tensor from.
        source: PathBuf,
        /// The tensor's name there.
        name: String,
        /// The model to add it to.
        destination: PathBuf,
        /// Its name in DST (its own name by default).
        #[arg(long = "as", value_name = "NEW")]
        as_name: Option<String>,
        #[command(flatten)]
        output: Output,
    },
    /// Remove a tensor (a rewrite).
    Remove {
        /// The file.
        file: PathBuf,
        /// The tensor.
        name: String,
        #[command(flatten)]
        output: Output,
    },
}

pub fn run(command: &StructureCommand) -> anyhow::Result<()> {
    let (file, output) = match command {
        StructureCommand::Rename { file, output, .. }
        | StructureCommand::Remove { file, output, .. } => (file, output),
        StructureCommand::Export {
            file,
            name,
            output,
            dry_run,
        } => {
            return super::patch::export(file, name, output, *dry_run);
        }
        StructureCommand::Import {
            file,
            name,
            input,
            dry_run,
        } => return super::patch::import(file, name, input, *dry_run),
        StructureCommand::Requantize(args) => return requantize(args),
        StructureCommand::Copy {
            source,
            name,
            destination,
            as_name,
            output,
        } => {
            return super::surgery::copy(source, name, destination, as_name.as_deref(), output);
        }
    };
    {
        let map = MappedFile::open(file)?;
        let gguf = map.parse()?;
        let name = match command {
            StructureCommand::Rename { from, .. } => from,
            StructureCommand::Remove { name, .. } => name,
            _ => unreachable!("handled above"),
        };
        if gguf.tensor(name).is_none() {
            bail!("no tensor named {name:?} in {}", file.display());
        }
        if output.dry_run {
            println!(
                "dry run: the tensor exists; the rewrite would go to {}",
                output.output.as_deref().unwrap_or(file).display()
            );
            return Ok(());
        }
    }
    let outcome = rewrite(file, output, |_, writer| match command {
        StructureCommand::Rename { from, to, .. } => rename_tensor(writer, from, to),
        StructureCommand::Remove { name, .. } => remove_tensor(writer, name),
        _ => unreachable!("handled above"),
    })?;
    print_rewrite("", &outcome);
    note_archived(outcome.archived_journal.as_deref());
    Ok(())
}

/// Arguments of `hotpatch requantize` and `hotpatch tensor requantize`.
#[derive(Debug, clap::Args)]
pub struct RequantizeArgs {
    /// The file.
    pub file: PathBuf,
    /// A regular expression: tensors whose names match it are converted.
    #[arg(long, value_name = "REGEX")]
    pub tensors: String,
    /// The target type (Q8_0, Q4_K, F16, ...).
    #[arg(long = "type", value_name = "TYPE", value_parser = parse_ggml_type)]
    pub target: byte_tier::GgmlType,
    /// An importance matrix (llama-imatrix's GGUF or legacy .dat output): tensors it
    /// names are quantized with its weights, as llama-quantize --imatrix does.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    #[command(flatten)]
    pub output: Output,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn parse_ggml_type(text: &str) -> Result<byte_tier::GgmlType, String> {
    byte_tier::GgmlType::from_name(text).ok_or_else(|| format!("unknown ggml type {text:?}"))
}

pub fn requantize(args: &RequantizeArgs) -> anyhow::Result<()> {
    let pattern = regex::Regex::new(&args.tensors)?;
    let select = |name: &str| pattern.is_match(name);
    let imatrix = match &args.imatrix {
        Some(path) => Some(byte_tier::imatrix::ImportanceMatrix::read(path)?),
        None => None,
    };
    if args.output.dry_run {
        let map = MappedFile::open(&args.file)?;
        let gguf = map.parse()?;
        let mut writer = byte_tier::GgufWriter::from_gguf(&gguf);
        let done = byte_tier::edit::requantize_tensors_weighted(
            &gguf,
            &mut writer,
            &select,
            args.target,
            imatrix.as_ref(),
        )?;
        let layout = writer.layout()?;
        println!(
            "dry run: would convert {} tensors to {}; size {} -> {} bytes",
            done.len(),
            args.target,
            gguf.file_len(),
            layout.file_len
        );
        return Ok(());
    }
    let outcome = rewrite(&args.file, &args.output, |gguf, writer| {
        byte_tier::edit::requantize_tensors_weighted(
            gguf,
            writer,
            &select,
            args.target,
            imatrix.as_ref(),
        )
    })?;
    if outcome.result.is_empty() {
        println!(
            "no tensor matched {:?} (or all are {} already): the file was rewritten unchanged",
            args.tensors, args.target
        );
    }
    if args.json {
        let tensors: Vec<_> = outcome
            .result
            .iter()
            .map(|r| json!({"name": r.name, "from": r.from.name(), "bytes_before": r.bytes_before, "bytes_after": r.bytes_after, "weighted": r.weighted}))
            .collect();
        println!(
            "{}",
            json!({"output": outcome.output, "target": args.target.name(), "tensors": tensors,
                "bytes_before": outcome.input_len, "bytes_after": outcome.bytes_written})
        );
    } else {
        for r in &outcome.result {
            println!(
                "{}: {} -> {} ({} -> {} bytes{})",
                r.name,
                r.from,
                args.target,
                r.bytes_before,
                r.bytes_after,
                if r.weighted {
                    ", importance-weighted"
                } else {
                    ""
                }
            );
        }
        print_rewrite("", &outcome);
    }
    note_archived(outcome.archived_journal.as_deref());
    Ok(())
}
