//! `hotpatch prune` and `hotpatch tensor rename|remove`: rewrites that change the tensor
//! table.

use std::path::PathBuf;

use anyhow::bail;
use byte_tier::MappedFile;
use byte_tier::edit::{prune_layers, remove_tensor, rename_tensor};
use serde_json::json;

use super::meta::{Output, note_archived, rewrite};

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
        println!(
            "wrote {} ({} -> {} bytes)",
            outcome.output.display(),
            outcome.input_len,
            outcome.bytes_written
        );
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
    };
    {
        let map = MappedFile::open(file)?;
        let gguf = map.parse()?;
        let name = match command {
            StructureCommand::Rename { from, .. } => from,
            StructureCommand::Remove { name, .. } => name,
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
    })?;
    println!(
        "wrote {} ({} -> {} bytes)",
        outcome.output.display(),
        outcome.input_len,
        outcome.bytes_written
    );
    note_archived(outcome.archived_journal.as_deref());
    Ok(())
}
