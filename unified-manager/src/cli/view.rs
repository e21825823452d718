//! `hotpatch hexdump` and `hotpatch search`: looking at bytes without changing them.

use std::path::PathBuf;

use byte_tier::{BytePatcher, DryRun, Gguf, MappedFile, tensor_range};
use serde_json::json;

use super::args::{RangeArgs, pattern_bytes};

/// Arguments of `hotpatch hexdump`.
#[derive(Debug, clap::Args)]
pub struct HexdumpArgs {
    /// The file.
    pub file: PathBuf,
    #[command(flatten)]
    pub range: RangeArgs,
    /// Print JSON: the range and its bytes in hexadecimal.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `hotpatch search`.
#[derive(Debug, clap::Args)]
pub struct SearchArgs {
    /// The file.
    pub file: PathBuf,
    /// The pattern: text, or hexadecimal with --hex or a 0x prefix.
    pub pattern: String,
    /// Read the pattern as hexadecimal.
    #[arg(long)]
    pub hex: bool,
    /// Search only this tensor's data.
    #[arg(long, value_name = "NAME")]
    pub tensor: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Print at most this many matches (all are counted).
    #[arg(long, default_value = "100")]
    pub limit: usize,
}

/// The file a command looks at: with `--tensor` in a shard set, the shard that holds
/// the tensor; otherwise the file named.
fn file_for(file: &std::path::Path, tensor: Option<&str>) -> anyhow::Result<PathBuf> {
    Ok(match tensor {
        Some(name) => byte_tier::split::file_holding_tensor(file, name)?,
        None => file.to_owned(),
    })
}

pub fn hexdump(args: &HexdumpArgs) -> anyhow::Result<()> {
    let map = MappedFile::open(file_for(&args.file, args.range.tensor.as_deref())?)?;
    let view = DryRun::new(map.bytes());
    let range = args.range.resolve(&view, 256)?;
    if args.json {
        let bytes = view.read(range.clone())?;
        println!(
            "{}",
            json!({"offset": range.start, "len": range.end - range.start, "tensor": args.range.tensor,
                "hex": byte_tier::ops::to_hex(bytes)})
        );
        return Ok(());
    }
    print!("{}", view.hexdump(range)?);
    Ok(())
}

pub fn search(args: &SearchArgs) -> anyhow::Result<()> {
    let pattern = pattern_bytes(&args.pattern, args.hex)?;
    let map = MappedFile::open(file_for(&args.file, args.tensor.as_deref())?)?;
    let view = DryRun::new(map.bytes());
    let within = match &args.tensor {
        Some(name) => {
            let gguf = Gguf::parse(map.bytes())?;
            Some(tensor_range(gguf.require_tensor(name)?, None)?)
        }
        None => None,
    };
    let base = within.as_ref().map_or(0, |r| r.start);
    let found = view.search(&pattern, within)?;
    if args.json {
        let shown: Vec<u64> = found.iter().take(args.limit).copied().collect();
        println!(
            "{}",
            json!({"count": found.len(), "offsets": shown, "tensor": args.tensor, "tensor_data_offset": base})
        );
        return Ok(());
    }
    for offset in found.iter().take(args.limit) {
        match &args.tensor {
            Some(name) => println!("{offset}  ({name} + {})", offset - base),
            None => println!("{offset}"),
        }
    }
    if found.len() > args.limit {
        println!("... {} more", found.len() - args.limit);
    }
    println!("{} match(es)", found.len());
    Ok(())
}
