//! `hotpatch meta`: read and change metadata, in place when the size allows, otherwise
//! through an atomic rewrite.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use byte_tier::edit::{in_place_metadata_write, parse_metadata_value, rewrite_file};
use byte_tier::{BytePatcher, InPlaceFile, MappedFile, Value, ValueType};

use super::progress::{bytes_bar, reporter};

/// Arguments of `hotpatch meta`.
#[derive(Debug, clap::Args)]
pub struct MetaArgs {
    #[command(subcommand)]
    pub command: MetaCommand,
}

/// Where and how a metadata change is written.
#[derive(Debug, Clone, clap::Args)]
pub struct Output {
    /// Write the result to this file instead of changing FILE.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Say what would change and write nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// A metadata command.
#[derive(Debug, clap::Subcommand)]
pub enum MetaCommand {
    /// Print one key's value.
    Get {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// Print JSON: the key, its type and its value.
        #[arg(long)]
        json: bool,
    },
    /// Set a key (added when missing). In place when the encoded size is unchanged.
    Set {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// The value, as text (true/false for BOOL).
        value: String,
        /// The value type (UINT32, INT32, FLOAT32, BOOL, STRING, ... or u32, f32, str):
        /// by default the key's current type, or STRING for a new key.
        #[arg(long = "type", value_name = "T", value_parser = parse_value_type)]
        value_type: Option<ValueType>,
        #[command(flatten)]
        output: Output,
    },
    /// Set a string key from a file's contents (a chat template, for example).
    SetFile {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        /// The file holding the value (UTF-8).
        path: PathBuf,
        #[command(flatten)]
        output: Output,
    },
    /// Remove a key (always a rewrite).
    Delete {
        /// The file.
        file: PathBuf,
        /// The key.
        key: String,
        #[command(flatten)]
        output: Output,
    },
}

fn parse_value_type(text: &str) -> Result<ValueType, String> {
    ValueType::from_name(text)
        .filter(|t| *t != ValueType::Array)
        .ok_or_else(|| format!("unknown or unsupported value type {text:?}"))
}

/// The file that holds `key` for a command given `file`: in a shard set, the general
/// metadata lives in the first shard, and each shard's `split.*` keys in itself, which
/// only split and merge may change.
fn metadata_file(file: &Path, key: &str, writing: bool) -> anyhow::Result<PathBuf> {
    let Some(set) = byte_tier::split::open_set_of(file)? else {
        return Ok(file.to_owned());
    };
    if key.starts_with("split.") {
        if writing {
            bail!(
                "{key} is part of the shard set's structure; split and merge write it, meta does not"
            );
        }
        return Ok(file.to_owned());
    }
    Ok(set.files()[0].path().to_owned())
}

pub fn run(args: &MetaArgs) -> anyhow::Result<()> {
    match &args.command {
        MetaCommand::Get { file, key, json } => {
            let file = &metadata_file(file, key, false)?;
            let map = MappedFile::open(file)?;
            let gguf = map.parse()?;
            let value = gguf.get(key).with_context(|| format!("no key {key:?}"))?;
            if *json {
                println!(
                    "{}",
                    serde_json::json!({"key": key, "type": super::inspect::pretty_type(&value),
                        "value": super::inspect::to_json(&value)})
                );
                return Ok(());
            }
            match value.as_str() {
                Some(s) => println!("{s}"),
                None => println!("{value}"),
            }
            Ok(())
        }
        MetaCommand::Set {
            file,
            key,
            value,
            value_type,
            output,
        } => {
            let file = &metadata_file(file, key, true)?;
            let parsed = {
                let map = MappedFile::open(file)?;
                let gguf = map.parse()?;
                parse_metadata_value(&gguf, key, value, *value_type)?
            };
            set(file, key, parsed, output)
        }
        MetaCommand::SetFile {
            file,
            key,
            path,
            output,
        } => {
            let file = &metadata_file(file, key, true)?;
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            set(file, key, Value::String(text), output)
        }
        MetaCommand::Delete { file, key, output } => {
            let file = &metadata_file(file, key, true)?;
            {
                let map = MappedFile::open(file)?;
                if map.parse()?.get(key).is_none() {
                    bail!("no key {key:?} in {}", file.display());
                }
            }
            if output.dry_run {
                println!(
                    "dry run: would rewrite {} without {key:?}",
                    target(file, output).display()
                );
                return Ok(());
            }
            let outcome = rewrite(file, output, |_, writer| {
                writer.remove(key);
                Ok(())
            })?;
            print_rewrite(&format!("removed {key:?}: "), &outcome);
            note_archived(outcome.archived_journal.as_deref());
            Ok(())
        }
    }
}

fn target<'a>(file: &'a Path, output: &'a Output) -> &'a Path {
    output.output.as_deref().unwrap_or(file)
}

fn set(file: &Path, key: &str, value: Value, output: &Output) -> anyhow::Result<()> {
    if output.output.is_none() {
        let mut in_place = InPlaceFile::open(file)
            .with_context(|| format!("open {} for in-place editing", file.display()))?;
        let write = in_place_metadata_write(&in_place.gguf()?, key, &value)?;
        if let Some(write) = write {
            let range = write.range();
            if output.dry_run {
                let changed = in_place.read(range.clone())? != write.bytes.as_slice();
                println!(
                    "dry run: would set {key:?} in place ({} bytes at {}..{}){}",
                    write.bytes.len(),
                    range.start,
                    range.end,
                    if changed {
                        ""
                    } else {
                        ", which already hold that value"
                    }
                );
                return Ok(());
            }
            let receipt = in_place.commit(&format!("meta set {key}"), vec![write])?;
            match receipt.transaction {
                Some(id) => println!(
                    "set {key:?} in place: transaction {id}, {} bytes at {}",
                    receipt.bytes, range.start
                ),
                None => println!("{key:?} already holds that value: nothing changed"),
            }
            return Ok(());
        }
    }
    if output.dry_run {
        println!(
            "dry run: would rewrite {} with {key:?} set (its encoded size changes)",
            target(file, output).display()
        );
        return Ok(());
    }
    let outcome = rewrite(file, output, |_, writer| {
        writer.set(key, value);
        Ok(())
    })?;
    print_rewrite(&format!("set {key:?}: "), &outcome);
    note_archived(outcome.archived_journal.as_deref());
    Ok(())
}

/// Runs a rewrite with a progress bar.
pub fn rewrite<R>(
    file: &Path,
    output: &Output,
    edit: impl for<'a> FnOnce(
        &byte_tier::Gguf<'a>,
        &mut byte_tier::GgufWriter<'a>,
    ) -> byte_tier::Result<R>,
) -> anyhow::Result<byte_tier::edit::RewriteOutcome<R>> {
    let len = std::fs::metadata(file)
        .with_context(|| format!("stat {}", file.display()))?
        .len();
    let bar = bytes_bar("rewriting", len);
    let outcome = rewrite_file(file, output.output.as_deref(), &mut reporter(&bar), edit)
        .with_context(|| format!("rewrite {}", file.display()))?;
    bar.finish_and_clear();
    Ok(outcome)
}

/// Prints the file a rewrite wrote and its size before and after, after `what`.
pub fn print_rewrite<R>(what: &str, outcome: &byte_tier::edit::RewriteOutcome<R>) {
    println!(
        "{what}rewrote into {} ({} -> {} bytes)",
        outcome.output.display(),
        outcome.input_len,
        outcome.bytes_written
    );
}

pub fn note_archived(archived: Option<&Path>) {
    if let Some(path) = archived {
        eprintln!(
            "note: the layout changed, so earlier in-place transactions can no longer be reverted; their journal is kept at {}",
            path.display()
        );
    }
}
