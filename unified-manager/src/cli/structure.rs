//! `hotpatch prune` and `hotpatch tensor rename|remove`: rewrites that change the tensor
//! table.

use std::path::PathBuf;

use byte_tier::MappedFile;
use byte_tier::edit::{prune_layers, prune_layers_of_set, remove_tensor, rename_tensor};
use byte_tier::plan::{NoDetails, RewritePlan};
use byte_tier::split::SetRewritePlan;
use serde_json::json;

use super::meta::{Output, note_recovered, print_rewrite, run_rewrite};

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
}

pub fn prune(args: &PruneArgs) -> anyhow::Result<()> {
    if let Some(set) = super::sets::open_for_rewrite(&args.file, args.output.dry_run)? {
        let parsed = set.parse_all()?;
        let plan = SetRewritePlan::new(
            &set,
            &parsed,
            args.output.output.as_deref(),
            |parsed, writers| prune_layers_of_set(&parsed[0], writers, &args.layers),
        )?;
        let Some(outcome) = super::sets::run(plan, &args.output)? else {
            return Ok(());
        };
        if args.output.json {
            println!("{}", super::sets::outcome_json(&outcome));
        } else {
            print_pruned(&args.layers, &outcome.result);
            super::sets::print("", &outcome, false);
        }
        return Ok(());
    }
    note_recovered(super::plan::prepare(&args.file, args.output.dry_run)?);
    let map = MappedFile::open(&args.file)?;
    let gguf = map.parse()?;
    let plan = RewritePlan::new(
        &args.file,
        args.output.output.as_deref(),
        &gguf,
        |gguf, writer| prune_layers(gguf, writer, &args.layers),
    )?;
    let Some(outcome) = run_rewrite(plan, &args.output)? else {
        return Ok(());
    };
    let report = &outcome.result;
    if args.output.json {
        println!(
            "{}",
            json!({"output": outcome.output, "blocks_before": report.blocks_before, "blocks_after": report.blocks_after,
                "tensors_removed": report.tensors_removed, "tensors_renamed": report.tensors_renamed,
                "arrays_trimmed": report.arrays_trimmed, "bytes_before": outcome.input_len, "bytes_after": outcome.bytes_written})
        );
    } else {
        print_pruned(&args.layers, report);
        print_rewrite("", &outcome, false);
    }
    Ok(())
}

fn print_pruned(layers: &[u64], report: &byte_tier::edit::PruneReport) {
    println!(
        "pruned layers {:?}: blocks {} -> {}, {} tensors removed, {} renumbered, per-layer arrays trimmed: {}",
        layers,
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
        /// Print JSON (the plan, with --dry-run).
        #[arg(long)]
        json: bool,
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
        /// Print JSON (the plan, with --dry-run).
        #[arg(long)]
        json: bool,
    },
    /// Convert the tensors whose names match a regular expression to another type (a
    /// rewrite).
    Requantize(RequantizeArgs),
    /// Add a tensor of another model (rope_freqs, an MTP / nextn head) with a shape
    /// check, keeping its type (a rewrite of DST). SRC and DST may be any shard of a
    /// set: a set DST is written as a new set (-o OUT is its prefix, or its first
    /// shard's name), the tensor in its last shard (or --shard K) and
    /// split.tensors.count one more in every shard.
    Copy {
        /// The model to take the tensor from (a file, or any shard of a set).
        source: PathBuf,
        /// The tensor's name there.
        name: String,
        /// The model to add it to (a file, or any shard of a set).
        destination: PathBuf,
        /// Its name in DST (its own name by default).
        #[arg(long = "as", value_name = "NEW")]
        as_name: Option<String>,
        /// Into a shard set: the shard that receives the tensor, numbered from 1 as in
        /// the file names (the last by default).
        #[arg(long, value_name = "K")]
        shard: Option<u32>,
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
            json,
        } => {
            return super::patch::export(file, name, output, *dry_run, *json);
        }
        StructureCommand::Import {
            file,
            name,
            input,
            dry_run,
            json,
        } => return super::patch::import(file, name, input, *dry_run, *json),
        StructureCommand::Requantize(args) => return requantize(args),
        StructureCommand::Copy {
            source,
            name,
            destination,
            as_name,
            shard,
            output,
        } => {
            return super::surgery::copy(
                source,
                name,
                destination,
                as_name.as_deref(),
                *shard,
                output,
            );
        }
    };
    if let Some(set) = super::sets::open_for_rewrite(file, output.dry_run)? {
        let parsed = set.parse_all()?;
        let plan = SetRewritePlan::new(&set, &parsed, output.output.as_deref(), |_, writers| {
            let (name, to) = match command {
                StructureCommand::Rename { from, to, .. } => (from, Some(to)),
                StructureCommand::Remove { name, .. } => (name, None),
                _ => unreachable!("handled above"),
            };
            if let Some(to) = to
                && writers
                    .iter()
                    .any(|w| w.tensors().iter().any(|t| t.name == *to))
            {
                return Err(byte_tier::Error::InvalidEdit(format!(
                    "a tensor named {to:?} already exists in the set"
                )));
            }
            let holder = writers
                .iter_mut()
                .find(|w| w.tensors().iter().any(|t| t.name == *name))
                .ok_or_else(|| byte_tier::Error::NoSuchTensor(name.clone()))?;
            match to {
                Some(to) => rename_tensor(holder, name, to),
                None => remove_tensor(holder, name),
            }
            .map(|()| NoDetails {})
        })?;
        if let Some(outcome) = super::sets::run(plan, output)? {
            super::sets::print("", &outcome, output.json);
        }
        return Ok(());
    }
    note_recovered(super::plan::prepare(file, output.dry_run)?);
    let map = MappedFile::open(file)?;
    let gguf = map.parse()?;
    let plan = RewritePlan::new(file, output.output.as_deref(), &gguf, |_, writer| {
        match command {
            StructureCommand::Rename { from, to, .. } => rename_tensor(writer, from, to),
            StructureCommand::Remove { name, .. } => remove_tensor(writer, name),
            _ => unreachable!("handled above"),
        }
        .map(|()| NoDetails {})
    })?;
    if let Some(outcome) = run_rewrite(plan, output)? {
        print_rewrite("", &outcome, output.json);
    }
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
}

pub fn parse_ggml_type(text: &str) -> Result<byte_tier::GgmlType, String> {
    byte_tier::GgmlType::from_name(text).ok_or_else(|| format!("unknown ggml type {text:?}"))
}

/// The tensors a requantization converts.
#[derive(serde::Serialize)]
struct Converted {
    target: byte_tier::GgmlType,
    converted: Vec<byte_tier::edit::Requantized>,
}

pub fn requantize(args: &RequantizeArgs) -> anyhow::Result<()> {
    let pattern = regex::Regex::new(&args.tensors)?;
    let select = |name: &str| pattern.is_match(name);
    let imatrix = match &args.imatrix {
        Some(path) => Some(byte_tier::imatrix::ImportanceMatrix::read(path)?),
        None => None,
    };
    if let Some(set) = super::sets::open_for_rewrite(&args.file, args.output.dry_run)? {
        let parsed = set.parse_all()?;
        let plan = SetRewritePlan::new(
            &set,
            &parsed,
            args.output.output.as_deref(),
            |parsed, writers| {
                if let Some(imatrix) = &imatrix {
                    imatrix.check_shards(parsed)?;
                }
                let mut converted = Vec::new();
                for (gguf, writer) in parsed.iter().zip(writers) {
                    converted.extend(byte_tier::edit::requantize_tensors_of_shard(
                        gguf,
                        writer,
                        &select,
                        args.target,
                        imatrix.as_ref(),
                    )?);
                }
                Ok(Converted {
                    target: args.target,
                    converted,
                })
            },
        )?;
        let Some(outcome) = super::sets::run(plan, &args.output)? else {
            return Ok(());
        };
        if !args.output.json {
            print_converted(args, &outcome.result.converted);
        }
        super::sets::print("", &outcome, args.output.json);
        return Ok(());
    }
    note_recovered(super::plan::prepare(&args.file, args.output.dry_run)?);
    let map = MappedFile::open(&args.file)?;
    let gguf = map.parse()?;
    let plan = RewritePlan::new(
        &args.file,
        args.output.output.as_deref(),
        &gguf,
        |gguf, writer| {
            Ok(Converted {
                target: args.target,
                converted: byte_tier::edit::requantize_tensors_weighted(
                    gguf,
                    writer,
                    &select,
                    args.target,
                    imatrix.as_ref(),
                )?,
            })
        },
    )?;
    let Some(outcome) = run_rewrite(plan, &args.output)? else {
        return Ok(());
    };
    let converted = &outcome.result.converted;
    if converted.is_empty() {
        println!(
            "no tensor matched {:?} (or all are {} already): the file was rewritten unchanged",
            args.tensors, args.target
        );
    }
    if args.output.json {
        let tensors: Vec<_> = converted
            .iter()
            .map(|r| json!({"name": r.name, "from": r.from.name(), "bytes_before": r.bytes_before, "bytes_after": r.bytes_after, "weighted": r.weighted}))
            .collect();
        println!(
            "{}",
            json!({"output": outcome.output, "target": args.target.name(), "tensors": tensors,
                "bytes_before": outcome.input_len, "bytes_after": outcome.bytes_written})
        );
    } else {
        print_converted(args, converted);
        print_rewrite("", &outcome, false);
    }
    Ok(())
}

fn print_converted(args: &RequantizeArgs, converted: &[byte_tier::edit::Requantized]) {
    for r in converted {
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
}
