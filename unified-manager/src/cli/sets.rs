//! Rewrites of shard sets: `prune`, `requantize`, `optimize`, `layers duplicate`,
//! `tensor rename` and `tensor remove` given any shard of a set work on the whole set,
//! through one `byte_tier::split::SetRewritePlan` (all shards or none,
//! `split.tensors.count` kept right in every shard). In-place edits of
//! a set (`ablate`, `lora merge`, `safety`) are set transactions instead
//! (`unified_manager::surgery::SetSurgeryPlan`, `unified_manager::safety::SetSafetyPlan`).

use std::path::Path;

use anyhow::Context;
use byte_tier::split::{self, SetRewriteOutcome, SetRewritePlan, ShardSet};
use serde::Serialize;
use serde_json::json;

use super::meta::{Output, note_archived, note_recovered};
use super::progress::{bytes_bar, reporter};

/// The set `file` is a shard of, opened for a rewrite: `None` for a single file. Unless
/// this is a dry run, each shard's unfinished in-place transaction is rolled back first,
/// as for a single file.
pub fn open_for_rewrite(file: &Path, dry_run: bool) -> anyhow::Result<Option<ShardSet>> {
    let Some(name) = split::parse_shard_name(file).filter(|n| n.count > 1) else {
        return Ok(None);
    };
    for index in 0..name.count {
        let shard = split::shard_path(&name.prefix, index, name.count);
        if shard.exists() {
            note_recovered(super::plan::prepare(&shard, dry_run)?);
        }
    }
    Ok(Some(ShardSet::open(file)?))
}

/// Reports a set rewrite's plan with --dry-run, or applies it with a progress bar; shard
/// journals set aside by the rewrite are noted.
pub fn run<R: Serialize>(
    plan: SetRewritePlan<'_, R>,
    output: &Output,
) -> anyhow::Result<Option<SetRewriteOutcome<R>>> {
    let bar = bytes_bar("rewriting the set", plan.bytes_to_write());
    let drive = bar.clone();
    let plan = plan.with_progress(move |done, total| reporter(&drive)(done, total));
    let first = plan.first_shard().to_owned();
    let outcome = super::plan::run(plan, output.dry_run, output.json)
        .with_context(|| format!("rewrite the shard set of {}", first.display()))?;
    bar.finish_and_clear();
    if let Some(outcome) = &outcome {
        for archived in &outcome.archived_journals {
            note_archived(Some(archived));
        }
    }
    Ok(outcome)
}

/// The JSON of an applied set rewrite: the shards written, the sizes and the edit's
/// report.
pub fn outcome_json<R: Serialize>(outcome: &SetRewriteOutcome<R>) -> serde_json::Value {
    json!({"dry_run": false,
        "output": outcome.shards.first().map(|s| &s.output),
        "files": outcome.shards,
        "bytes_before": outcome.shards.iter().map(|s| s.bytes_before).sum::<u64>(),
        "bytes_after": outcome.shards.iter().map(|s| s.bytes_after).sum::<u64>(),
        "report": outcome.result})
}

/// Prints an applied set rewrite after `what`, one line per shard (or, with `json`, the
/// outcome as JSON).
pub fn print<R: Serialize>(what: &str, outcome: &SetRewriteOutcome<R>, json: bool) {
    if json {
        println!("{}", outcome_json(outcome));
        return;
    }
    let written = outcome.shards.iter().filter(|s| s.rewritten).count();
    println!("{what}rewrote {written} of {} shards", outcome.shards.len());
    for shard in &outcome.shards {
        if shard.rewritten {
            println!(
                "  {} ({} -> {} bytes)",
                shard.output.display(),
                shard.bytes_before,
                shard.bytes_after
            );
        } else {
            println!("  {} unchanged", shard.output.display());
        }
    }
}
