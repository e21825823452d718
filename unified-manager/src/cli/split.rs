//! `hotpatch split` and `hotpatch merge`: shard sets as llama.cpp's gguf-split writes
//! them.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use byte_tier::MappedFile;
use byte_tier::split::{self, OutputFile, ShardSet, SplitLimit, SplitOptions, SplitPlan};
use serde_json::json;

/// Arguments of `hotpatch split`.
#[derive(Debug, clap::Args)]
pub struct SplitArgs {
    /// The file to split.
    pub file: PathBuf,
    /// Shards are written as OUT_PREFIX-00001-of-0000N.gguf.
    pub out_prefix: PathBuf,
    /// Start a new shard before the tensors' padded sizes pass N megabytes (N M) or
    /// gigabytes (N G).
    #[arg(long, value_name = "N(M|G)", conflicts_with = "split_max_tensors")]
    pub split_max_size: Option<String>,
    /// At most N tensors per shard (default 128).
    #[arg(long, value_name = "N")]
    pub split_max_tensors: Option<u64>,
    /// Keep the first shard free of tensors (metadata only).
    #[arg(long)]
    pub no_tensor_first_split: bool,
    /// Print the plan and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `hotpatch merge`.
#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// Any shard of the set (usually the first).
    pub first_shard: PathBuf,
    /// The merged file (must not exist).
    pub out: PathBuf,
    /// Print the plan and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn split(args: &SplitArgs) -> anyhow::Result<()> {
    let limit = match (&args.split_max_size, args.split_max_tensors) {
        (Some(size), _) => SplitLimit::parse_size(size)?,
        (None, Some(n)) => SplitLimit::Tensors(n),
        (None, None) => SplitOptions::default().limit,
    };
    let options = SplitOptions {
        limit,
        no_tensor_first_split: args.no_tensor_first_split,
    };
    let map = MappedFile::open(&args.file)?;
    let gguf = map
        .parse()
        .with_context(|| format!("{} is not a valid GGUF file", args.file.display()))?;
    let plan = SplitPlan::new(&gguf, &args.out_prefix, &options)?;
    let plan = split::SplitFiles::new(&args.file, &gguf, plan)?;
    match super::plan::run(plan, args.dry_run, args.json)? {
        Some(outputs) => print_outputs(&outputs, args.json),
        None => Ok(()),
    }
}

pub fn merge(args: &MergeArgs) -> anyhow::Result<()> {
    let set = ShardSet::open(&args.first_shard)?;
    let plan = split::MergeFiles::new(&set, &args.out)?;
    match super::plan::run(plan, args.dry_run, args.json)? {
        Some(output) => print_outputs(std::slice::from_ref(&output), args.json),
        None => Ok(()),
    }
}

fn print_outputs(outputs: &[OutputFile], json: bool) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        let value = json!({ "dry_run": false, "files": outputs });
        writeln!(out, "{}", serde_json::to_string_pretty(&value)?)?;
        return Ok(());
    }
    for output in outputs {
        writeln!(
            out,
            "wrote {} ({} tensors, {} bytes)",
            output.path.display(),
            output.n_tensors,
            output.n_bytes
        )?;
    }
    Ok(())
}
