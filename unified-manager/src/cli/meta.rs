//! `hotpatch meta`: read and change metadata, in place when the size allows, otherwise
//! through an atomic rewrite.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use byte_tier::edit::{RewriteOutcome, in_place_metadata_write, parse_metadata_value};
use byte_tier::plan::{NoDetails, RewritePlan, WritePlan};
use byte_tier::{MappedFile, Value, ValueType};

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
    /// Print JSON (the plan, with --dry-run).
    #[arg(long)]
    pub json: bool,
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
            note_recovered(super::plan::prepare(file, output.dry_run)?);
            let map = MappedFile::open(file)?;
            let gguf = map.parse()?;
            if gguf.get(key).is_none() {
                bail!("no key {key:?} in {}", file.display());
            }
            let plan = RewritePlan::new(file, output.output.as_deref(), &gguf, |_, writer| {
                writer.remove(key);
                Ok(NoDetails {})
            })?;
            if let Some(outcome) = run_rewrite(plan, output)? {
                print_rewrite(&format!("removed {key:?}: "), &outcome, output.json);
            }
            Ok(())
        }
    }
}

/// Prints what recovery rolled back before a plan was made.
pub fn note_recovered(report: Option<byte_tier::RecoveryReport>) {
    if let Some(report) = report {
        eprintln!(
            "recovered: rolled back unfinished transaction {} ({}, {} bytes)",
            report.transaction, report.name, report.bytes
        );
    }
}

/// The key a metadata plan sets.
#[derive(serde::Serialize)]
struct MetaDetails<'k> {
    key: &'k str,
}

fn set(file: &Path, key: &str, value: Value, output: &Output) -> anyhow::Result<()> {
    note_recovered(super::plan::prepare(file, output.dry_run)?);
    let map = MappedFile::open(file)?;
    let gguf = map.parse()?;
    if output.output.is_none()
        && let Some(write) = in_place_metadata_write(&gguf, key, &value)?
    {
        let start = write.offset;
        let plan = WritePlan::new(
            file,
            map.bytes(),
            format!("meta set {key}"),
            vec![write],
            MetaDetails { key },
        )?;
        let applied = super::plan::run(plan, output.dry_run, output.json)
            .map_err(|e| super::patch::with_server_hint(e, file))?;
        if let Some(receipt) = applied {
            if output.json {
                println!(
                    "{}",
                    serde_json::json!({"dry_run": false, "key": key, "in_place": true,
                        "transaction": receipt.transaction, "bytes": receipt.bytes})
                );
                return Ok(());
            }
            match receipt.transaction {
                Some(id) => println!(
                    "set {key:?} in place: transaction {id}, {} bytes at {start}",
                    receipt.bytes
                ),
                None => println!("{key:?} already holds that value: nothing changed"),
            }
        }
        return Ok(());
    }
    let plan = RewritePlan::new(file, output.output.as_deref(), &gguf, |_, writer| {
        writer.set(key, value);
        Ok(NoDetails {})
    })?;
    if let Some(outcome) = run_rewrite(plan, output)? {
        print_rewrite(&format!("set {key:?}: "), &outcome, output.json);
    }
    Ok(())
}

/// Reports a rewrite's plan with --dry-run, or applies it with a progress bar; a
/// journal set aside by the rewrite is noted.
pub fn run_rewrite<'a, R: serde::Serialize>(
    plan: RewritePlan<'a, R>,
    output: &Output,
) -> anyhow::Result<Option<RewriteOutcome<R>>> {
    let bar = bytes_bar("rewriting", plan.size_after());
    let drive = bar.clone();
    let plan = plan.with_progress(move |done, total| reporter(&drive)(done, total));
    let file = plan.input().to_owned();
    let outcome = super::plan::run(plan, output.dry_run, output.json)
        .with_context(|| format!("rewrite {}", file.display()))?;
    bar.finish_and_clear();
    if let Some(outcome) = &outcome {
        note_archived(outcome.archived_journal.as_deref());
    }
    Ok(outcome)
}

/// Prints the file a rewrite wrote and its size before and after, after `what` (or, with
/// `json`, the outcome as JSON).
pub fn print_rewrite<R: serde::Serialize>(what: &str, outcome: &RewriteOutcome<R>, json: bool) {
    if json {
        println!(
            "{}",
            serde_json::json!({"dry_run": false, "output": outcome.output,
                "bytes_before": outcome.input_len, "bytes_after": outcome.bytes_written,
                "report": outcome.result})
        );
        return;
    }
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
