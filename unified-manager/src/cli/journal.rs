//! `hotpatch history`, `hotpatch revert`, `hotpatch recover`: the journal of in-place edits.

use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use byte_tier::{Journal, TransactionState};
use memory_tier::{AttachMode, LiveModel};
use serde_json::json;

/// Arguments of `hotpatch history`.
#[derive(Debug, clap::Args)]
pub struct HistoryArgs {
    /// The file.
    pub file: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `hotpatch revert`.
#[derive(Debug, clap::Args)]
pub struct RevertArgs {
    /// The file.
    pub file: PathBuf,
    /// The transaction to revert (see `hotpatch history`).
    #[arg(required_unless_present_any = ["last", "patch"], conflicts_with_all = ["last", "patch"])]
    pub id: Option<u64>,
    /// Revert the last transaction that is not reverted yet.
    #[arg(long)]
    pub last: bool,
    /// FILE is a shard of a set and ID (or --last) a transaction of the set's journal (a
    /// set transaction: `ablate` or `lora merge` into a set), reverted in every shard as
    /// one set transaction.
    #[arg(long, conflicts_with_all = ["server", "agent"])]
    pub set: bool,
    /// Say what would be restored and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON (the plan, with --dry-run).
    #[arg(long)]
    pub json: bool,
    /// Revert through the admin API of the `hotpatch serve` that holds FILE
    /// (`http://127.0.0.1:8081`), so that its caches stay right.
    #[arg(long, value_name = "URL", requires = "admin_token_file")]
    pub server: Option<String>,
    /// A file holding that proxy's admin token.
    #[arg(long, value_name = "FILE", requires = "server")]
    pub admin_token_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust, besides the system's, when the proxy
    /// serves HTTPS (`hotpatch serve --tls-cert`) with a certificate a private CA signed.
    #[arg(long, value_name = "FILE", requires = "server")]
    pub admin_ca: Option<PathBuf>,
    /// Revert through the agent at SOCKET (see `hotpatch launch`).
    #[arg(long, value_name = "SOCKET", conflicts_with = "server")]
    pub agent: Option<PathBuf>,
    /// With --agent: the patch was journaled (`patch --persist`).
    #[arg(long, requires = "agent")]
    pub persist: bool,
    /// With --agent: the live patch to revert, by id or name.
    #[arg(
        long,
        value_name = "ID|NAME",
        requires = "agent",
        conflicts_with = "last"
    )]
    pub patch: Option<String>,
}

/// Arguments of `hotpatch recover`.
#[derive(Debug, clap::Args)]
pub struct RecoverArgs {
    /// The file.
    pub file: PathBuf,
    /// Say what would be rolled back and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON (the plan, with --dry-run).
    #[arg(long)]
    pub json: bool,
}

fn time(ms: u64) -> String {
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    let secs = at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    // UTC, from the Unix time, without a date crate: days since 1970 → civil date.
    let days = secs / 86_400;
    let (h, m, s) = (secs % 86_400 / 3600, secs % 3600 / 60, secs % 60);
    let (y, mo, d) = civil_from_days(days as i64);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{m:02}:{s:02}Z")
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

pub fn history(args: &HistoryArgs) -> anyhow::Result<()> {
    if !byte_tier::journal_path(&args.file).exists() {
        if args.json {
            println!("[]");
        } else {
            println!(
                "no journal: {} was never edited in place",
                args.file.display()
            );
        }
        return Ok(());
    }
    let journal = Journal::open_read_only(&args.file)?;
    let mut rows = Vec::new();
    for t in journal.transactions() {
        let (state, ended) = match t.state {
            TransactionState::Unfinished => ("unfinished", None),
            TransactionState::Committed(at) => ("committed", Some(at)),
            TransactionState::RolledBack(at) => ("rolled back", Some(at)),
        };
        let reverted_by = journal.reverted_by(t.id);
        if args.json {
            let writes: Vec<_> = t
                .writes
                .iter()
                .map(|w| {
                    json!({"offset": w.offset, "len": w.len,
                    "original_sha256": byte_tier::ops::to_hex(&w.original_sha256),
                    "new_sha256": byte_tier::ops::to_hex(&w.new_sha256)})
                })
                .collect();
            rows.push(
                json!({"id": t.id, "name": t.name, "state": state, "started_ms": t.started_ms,
                "ended_ms": ended, "reverts": t.reverts, "reverted_by": reverted_by,
                "bytes": t.bytes(), "writes": writes}),
            );
        } else {
            let mut note = String::new();
            if let Some(r) = reverted_by {
                note = format!("  (reverted by {r})");
            }
            println!(
                "{:>4}  {}  {:<11}  {:>10} bytes  {}{note}",
                t.id,
                time(t.started_ms),
                state,
                t.bytes(),
                t.name
            );
        }
    }
    if args.json {
        println!("{}", serde_json::Value::Array(rows));
    } else if journal.transactions().is_empty() {
        println!("the journal is empty");
    }
    Ok(())
}

pub fn revert(args: &RevertArgs) -> anyhow::Result<()> {
    if let Some(server) = &args.server {
        return revert_through_server(args, server);
    }
    if let Some(socket) = &args.agent {
        use super::agent::Which;
        if args.dry_run {
            bail!("--dry-run is not available with --agent: the agent's state is in the server");
        }
        let which = match (&args.patch, args.id) {
            (Some(key), _) => Which::Patch(key),
            (None, Some(id)) => Which::Transaction(id),
            (None, None) => Which::Last,
        };
        let names = super::agent::revert(&args.file, socket, args.persist, which)?;
        for name in names {
            println!(
                "reverted {name:?} through the agent at {}",
                socket.display()
            );
        }
        return Ok(());
    }
    if args.set {
        return revert_set(args);
    }
    // Without a journal there is nothing to revert (and attaching would create one).
    if !byte_tier::journal_path(&args.file).exists() {
        bail!("nothing to revert: {} has no journal", args.file.display());
    }
    // Live patches (the journal notes them) are reverted through a live model, which
    // knows what lies over what; other transactions byte for byte. A file that is not a
    // GGUF (byte edits work on any file) has no live patches.
    let Ok(model) = LiveModel::attach(&args.file, AttachMode::Shared) else {
        return revert_in_place(args);
    };
    let id = match args.id {
        Some(id) => id,
        None => {
            let live_last = model
                .applied_patches()
                .iter()
                .filter_map(|a| a.journal_transaction)
                .max();
            let journal = Journal::open_read_only(&args.file)?;
            let plain_last = last_unreverted(&journal, |t| t.note.is_empty());
            match plain_last.max(live_last) {
                Some(id) => id,
                None => bail!("nothing to revert: no committed transaction is left unreverted"),
            }
        }
    };
    let live = model.patches_of_transaction(id);
    if !live.is_empty() {
        if args.dry_run {
            println!(
                "dry run: reverting transaction {id} would revert {} live patch(es)",
                live.len()
            );
            return Ok(());
        }
        let reverted = model.revert_transaction(id)?;
        println!(
            "transaction {id}: reverted {} live patch(es) (their bytes checked before and after)",
            reverted.len()
        );
        return Ok(());
    }
    drop(model);
    revert_transaction_in_place(args, id)
}

/// The last transaction of `journal` that committed, is not a revert, was not reverted,
/// and that `keep` accepts.
fn last_unreverted(
    journal: &Journal,
    keep: impl Fn(&byte_tier::Transaction) -> bool,
) -> Option<u64> {
    journal
        .transactions()
        .iter()
        .rev()
        .find(|t| {
            matches!(t.state, TransactionState::Committed(_))
                && t.reverts.is_none()
                && journal.reverted_by(t.id).is_none()
                && keep(t)
        })
        .map(|t| t.id)
}

/// `hotpatch revert --set`: a set transaction reverted in every shard it wrote, as one
/// set transaction.
fn revert_set(args: &RevertArgs) -> anyhow::Result<()> {
    use byte_tier::split::transaction;
    let name = byte_tier::split::parse_shard_name(&args.file)
        .with_context(|| format!("{} is not named as a shard", args.file.display()))?;
    let target = transaction::set_journal_target(&name.prefix);
    if !byte_tier::journal_path(&target).exists() {
        bail!(
            "nothing to revert: the set of {} has no set journal",
            args.file.display()
        );
    }
    let id = match args.id {
        Some(id) => id,
        None => {
            let journal = Journal::open_read_only(&target)?;
            last_unreverted(&journal, |_| true)
                .context("nothing to revert: no set transaction is left unreverted")?
        }
    };
    let parts = transaction::plan_set_revert(&args.file, id)?;
    let bytes: usize = parts
        .iter()
        .flat_map(|p| &p.writes)
        .map(|w| w.bytes.len())
        .sum();
    if args.dry_run {
        let plan = json!({"kind": "revert_set", "set_transaction": id,
            "shards": parts.iter().map(|p| json!({"shard": p.shard, "reverts": p.reverts,
                "writes": p.writes.len()})).collect::<Vec<_>>(),
            "bytes": bytes});
        return super::plan::report(&plan, parts.is_empty(), args.json);
    }
    let receipt =
        transaction::run_set_transaction(&args.file, &format!("revert {id}"), Some(id), parts)?;
    if args.json {
        println!(
            "{}",
            json!({"dry_run": false, "reverted": id, "transaction": receipt.transaction,
                "bytes": receipt.bytes()})
        );
    } else {
        println!(
            "reverted set transaction {id} in {} shard(s): {} bytes restored",
            receipt.parts.len(),
            receipt.bytes()
        );
    }
    Ok(())
}

/// Reverts a transaction byte for byte (no live model: the file is not a GGUF, or the
/// transaction made no live patch).
fn revert_in_place(args: &RevertArgs) -> anyhow::Result<()> {
    let id = match args.id {
        Some(id) => id,
        None => {
            let last = byte_tier::journal_path(&args.file)
                .exists()
                .then(|| Journal::open_read_only(&args.file))
                .transpose()?
                .and_then(|journal| last_unreverted(&journal, |t| t.note.is_empty()));
            match last {
                Some(id) => id,
                None => {
                    bail!("nothing to revert: no committed transaction is left unreverted")
                }
            }
        }
    };
    revert_transaction_in_place(args, id)
}

fn revert_transaction_in_place(args: &RevertArgs, id: u64) -> anyhow::Result<()> {
    super::meta::note_recovered(super::plan::prepare(&args.file, args.dry_run)?);
    let plan = byte_tier::plan::WritePlan::revert(&args.file, id)?;
    let applied = super::plan::run(plan, args.dry_run, args.json)
        .map_err(|e| super::patch::with_server_hint(e, &args.file))?;
    let Some(receipt) = applied else {
        return Ok(());
    };
    if args.json {
        println!(
            "{}",
            json!({"dry_run": false, "reverted": id, "transaction": receipt.transaction,
                "bytes": receipt.bytes})
        );
        return Ok(());
    }
    println!(
        "transaction {}: reverted transaction {id}, restored {} bytes (checked against the original SHA-256)",
        receipt
            .transaction
            .map_or_else(|| "-".to_owned(), |t| t.to_string()),
        receipt.bytes
    );
    Ok(())
}

/// Reverts through a running proxy's admin API: the patch that journal transaction ID
/// applied, or the last one applied.
fn revert_through_server(args: &RevertArgs, server: &str) -> anyhow::Result<()> {
    let path = args
        .admin_token_file
        .as_deref()
        .context("--server needs --admin-token-file")?;
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("read the admin token from {}", path.display()))?;
    let client = super::admin_client(
        server,
        Some(token.trim().to_owned()),
        args.admin_ca.as_deref(),
    )?;
    let patches = client.patches()?;
    let chosen: Vec<&serde_json::Value> = match args.id {
        Some(id) => patches
            .iter()
            .filter(|p| p.get("journal_transaction").and_then(|t| t.as_u64()) == Some(id))
            .collect(),
        None => patches.iter().last().into_iter().collect(),
    };
    if chosen.is_empty() {
        bail!(
            "the proxy at {server} holds no applied patch{}",
            args.id
                .map_or_else(String::new, |id| format!(" of transaction {id}"))
        );
    }
    for patch in chosen.iter().rev() {
        let id = patch
            .get("id")
            .and_then(|v| v.as_str())
            .context("the proxy listed a patch without an id")?;
        if args.dry_run {
            println!("dry run: would revert live patch {id} through {server}");
            continue;
        }
        client.revert_patch(id)?;
        println!(
            "reverted live patch {id} ({}) through {server}",
            patch.get("name").and_then(|v| v.as_str()).unwrap_or("")
        );
    }
    Ok(())
}

pub fn recover(args: &RecoverArgs) -> anyhow::Result<()> {
    // A shard set's interrupted rewrite is finished first: until then the set does not
    // open. A dry run reports only that step.
    let mut finished_set = None;
    if let Some(recovery) = byte_tier::split::interrupted_set_rewrite(&args.file)? {
        let marker = recovery.marker.clone();
        match super::plan::run(recovery, args.dry_run, args.json)? {
            None => return Ok(()),
            Some(renamed) => {
                if !args.json {
                    println!(
                        "finished the interrupted rewrite of a shard set: {renamed} shard(s) renamed into place, {} removed",
                        marker.display()
                    );
                }
                finished_set = Some(renamed);
            }
        }
    }
    if !args.dry_run && byte_tier::split::open_set_of(&args.file)?.is_some() {
        return recover_set(args, finished_set);
    }
    let plan = byte_tier::plan::RecoveryPlan::new(&args.file)?;
    let Some(report) = super::plan::run(plan, args.dry_run, args.json)
        .map_err(|e| super::patch::with_server_hint(e, &args.file))?
    else {
        return Ok(());
    };
    if args.json {
        println!(
            "{}",
            json!({"dry_run": false, "rolled_back": report.as_ref().map(|r| r.transaction),
                "bytes": report.as_ref().map_or(0, |r| r.bytes),
                "finished_set_rewrite": finished_set})
        );
        return Ok(());
    }
    match report {
        Some(report) => print_recovered(&args.file, &report),
        None => println!("nothing to recover: no unfinished transaction"),
    }
    Ok(())
}

fn print_recovered(file: &std::path::Path, report: &byte_tier::RecoveryReport) {
    if report.completed {
        println!(
            "{}: completed unfinished transaction {} ({}): its shard-set transaction had committed, {} bytes kept",
            file.display(),
            report.transaction,
            report.name,
            report.bytes
        );
    } else {
        println!(
            "{}: rolled back unfinished transaction {} ({}): restored {} bytes in {} writes",
            file.display(),
            report.transaction,
            report.name,
            report.bytes,
            report.writes
        );
    }
}

/// `hotpatch recover` on a shard of several: every shard is recovered as the set's
/// journal decides (a part of a committed set transaction is completed, any other
/// unfinished one rolled back), so the shards end on the same side.
fn recover_set(args: &RecoverArgs, finished_set: Option<usize>) -> anyhow::Result<()> {
    let reports = byte_tier::split::transaction::recover_set(&args.file)
        .map_err(|e| super::patch::with_server_hint(e.into(), &args.file))?;
    if args.json {
        let shards: Vec<serde_json::Value> = reports
            .iter()
            .map(|(shard, r)| {
                json!({"shard": shard, "transaction": r.transaction,
                "completed": r.completed, "bytes": r.bytes})
            })
            .collect();
        println!(
            "{}",
            json!({"dry_run": false, "shards": shards, "finished_set_rewrite": finished_set})
        );
        return Ok(());
    }
    if reports.is_empty() {
        println!("nothing to recover: no shard of the set has an unfinished transaction");
    }
    for (shard, report) in &reports {
        print_recovered(shard, report);
    }
    Ok(())
}
