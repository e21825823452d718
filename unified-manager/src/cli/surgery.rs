//! `hotpatch ablate`, `hotpatch lora merge|unmerge`, `hotpatch layers duplicate` and
//! `hotpatch tensor copy`: the surgery byte-tier plans and unified-manager applies.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::Context;
use byte_tier::MappedFile;
use byte_tier::plan::RewritePlan;
use byte_tier::surgery::{
    AblationOptions, AblationPlan, GraftReport, GraftSource, LoraMergePlan, SetGraftPlan,
    copy_tensor_from, duplicate_layers, duplicate_layers_of_set, merge_label,
    plan_ablation_in_shards, plan_lora_merge_into_shards, read_directions, set_output_prefix,
};
use serde_json::json;
use unified_manager::surgery::{
    SetSurgeryPlan, SurgeryPlan, file_identity, find_set_merge, unmerge, unmerge_set,
};

use super::meta::{Output, note_recovered, print_rewrite, run_rewrite};

/// Parses `A..B` (blocks A to B-1).
pub fn parse_layers(text: &str) -> Result<Range<u64>, String> {
    let (start, end) = text
        .split_once("..")
        .ok_or_else(|| format!("{text:?}: expected A..B (blocks A to B-1)"))?;
    let number = |s: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|e| format!("{text:?}: {s:?} is not a block number: {e}"))
    };
    Ok(number(start)?..number(end)?)
}

/// Arguments of `hotpatch ablate`.
#[derive(Debug, clap::Args)]
pub struct AblateArgs {
    /// The model, edited in place through the journal (a running llama-server that maps
    /// it on CPU with --no-repack sees the change).
    pub file: PathBuf,
    /// The direction: a control-vector GGUF (direction.N per layer, as
    /// llama-cvector-generator writes it) or a .npy of one vector or one per layer.
    #[arg(long, value_name = "D")]
    pub direction: PathBuf,
    /// Only the blocks A..B (A to B-1); token_embd is edited whenever its kind is chosen.
    #[arg(long, value_name = "A..B", value_parser = parse_layers)]
    pub layers: Option<Range<u64>>,
    /// Tensor kinds, comma-separated (attn_output,ffn_down,token_embd); by default
    /// every matrix that writes into the residual stream.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub tensors: Option<Vec<String>>,
    /// How much of the component to remove (1 removes it all).
    #[arg(
        long,
        value_name = "W",
        default_value_t = 1.0,
        allow_hyphen_values = true
    )]
    pub weight: f32,
    /// Keep the norm of every vector written into the residual stream.
    #[arg(long)]
    pub norm_preserve: bool,
    /// An importance matrix (llama-imatrix's output) for requantizing the edited
    /// tensors, applied as llama-quantize --imatrix does.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// Say what would change and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn ablate(args: &AblateArgs) -> anyhow::Result<()> {
    // Into a shard set, the ablation is one set transaction over the shards.
    let set = super::sets::open_for_rewrite(&args.file, args.dry_run)?;
    if set.is_none() {
        note_recovered(super::plan::prepare(&args.file, args.dry_run)?);
    }
    let plan = {
        let map;
        let shards = match &set {
            Some(set) => set.parse_all()?,
            None => {
                map = MappedFile::open(&args.file)?;
                vec![map.parse()?]
            }
        };
        let gguf = &shards[0];
        let arch = gguf
            .architecture()
            .context("the model has no general.architecture")?;
        let n_embd = gguf.get_u64(&format!("{arch}.embedding_length"))?;
        let directions = read_directions(&args.direction, n_embd)
            .with_context(|| format!("direction {}", args.direction.display()))?;
        let options = AblationOptions {
            weight: args.weight,
            norm_preserve: args.norm_preserve,
            layers: args.layers.clone(),
            kinds: args.tensors.clone(),
            imatrix: match &args.imatrix {
                Some(path) => Some(std::sync::Arc::new(
                    byte_tier::imatrix::ImportanceMatrix::read(path)?,
                )),
                None => None,
            },
        };
        plan_ablation_in_shards(&shards, &directions, &options)?
    };
    let identity = file_identity(&args.direction)?;
    let label = format!(
        "ablate direction sha256:{identity} weight {}{}",
        args.weight,
        if args.norm_preserve {
            " norm-preserving"
        } else {
            ""
        }
    );
    let AblationPlan {
        weight,
        norm_preserve,
        tensors,
        skipped,
        notes,
        rewrites,
    } = plan;
    let details = json!({"weight": weight, "norm_preserve": norm_preserve, "tensors": tensors,
        "skipped": skipped, "notes": notes});
    let n_tensors = tensors.len();
    let into_set = set.is_some();
    drop(set);
    let revert = if into_set { "revert --set" } else { "revert" };
    let applied = run_surgery(
        &args.file,
        into_set,
        label,
        rewrites,
        &details,
        args.dry_run,
        args.json,
    )?;
    let Some(transaction) = applied else {
        return Ok(());
    };
    if args.json {
        let mut value = details;
        value["dry_run"] = json!(false);
        value["transaction"] = json!(transaction);
        println!("{value}");
        return Ok(());
    }
    for t in &tensors {
        let along = match &t.post_norm {
            Some(norm) => format!("{norm} ⊙ r (its post-norm)"),
            None => "r".to_owned(),
        };
        println!(
            "{} ({}): component along {along} {:.4e} -> {:.4e} exact, {:.4e} stored (noise floor {:.4e}); requantization rms {:.3e}, max {:.3e}; {} bytes change",
            t.name,
            t.ggml_type,
            t.component_before,
            t.component_exact,
            t.component_after,
            t.noise_floor,
            t.requantization.rms,
            t.requantization.max_abs,
            t.changed_bytes
        );
    }
    for s in &skipped {
        println!("not edited: {} ({}): {}", s.name, s.ggml_type, s.reason);
    }
    for note in &notes {
        println!("note: {note}");
    }
    match transaction {
        Some(id) => println!(
            "ablated {n_tensors} tensors as transaction {id} (`hotpatch {revert} {} {id}` undoes it)",
            args.file.display()
        ),
        None => println!("nothing changed"),
    }
    Ok(())
}

/// `hotpatch lora`.
#[derive(Debug, clap::Subcommand)]
pub enum LoraCommand {
    /// Merge a LoRA adapter into the model in place, each target requantized to its own
    /// type (journaled, revertible, seen live by a server that maps the file). Given any
    /// shard of a set, the whole set, as one set transaction.
    Merge {
        /// The model.
        file: PathBuf,
        /// The adapter, in llama.cpp's LoRA GGUF format.
        adapter: PathBuf,
        /// The adapter's scale S (W' = W + S·alpha/rank·B·A).
        #[arg(
            long,
            value_name = "S",
            default_value_t = 1.0,
            allow_hyphen_values = true
        )]
        scale: f32,
        /// An importance matrix (llama-imatrix's output) for requantizing the merged
        /// targets, applied as llama-quantize --imatrix does.
        #[arg(long, value_name = "FILE")]
        imatrix: Option<PathBuf>,
        /// Say what would change and write nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revert the last merge of this adapter, byte for byte.
    Unmerge {
        /// The model.
        file: PathBuf,
        /// The adapter that was merged (found in the journal by its SHA-256).
        adapter: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Print the writes the unmerge would make (the merge transaction's revert) and
        /// change nothing.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Reports (with `dry_run`) or applies the in-place rewrite of whole tensors an
/// ablation or a merge planned: one journal transaction in `file`, or, `into_set`, one
/// set transaction over the shards of `file`'s set. `None` for a dry run; otherwise the
/// transaction (itself `None` when no byte changed).
fn run_surgery(
    file: &Path,
    into_set: bool,
    label: String,
    rewrites: Vec<byte_tier::surgery::RewrittenTensor>,
    details: &serde_json::Value,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<Option<Option<u64>>> {
    if into_set {
        let plan = SetSurgeryPlan::new(file, label, rewrites, details.clone())?;
        super::plan::run(plan, dry_run, json)
    } else {
        let plan = SurgeryPlan::new(file, label, rewrites, details.clone())?;
        super::plan::run(plan, dry_run, json)
    }
}

/// Plans the merge of `adapter` into `file`, or into every shard of `set` when `file` is
/// one shard of several.
fn merge_plan(
    file: &Path,
    set: Option<&byte_tier::split::ShardSet>,
    adapter: &Path,
    scale: f32,
    imatrix: Option<&Path>,
) -> anyhow::Result<LoraMergePlan> {
    let imatrix = match imatrix {
        Some(path) => Some(byte_tier::imatrix::ImportanceMatrix::read(path)?),
        None => None,
    };
    let map;
    let shards = match set {
        Some(set) => set.parse_all()?,
        None => {
            map = MappedFile::open(file)?;
            vec![map.parse()?]
        }
    };
    let adapter_map = MappedFile::open(adapter)?;
    let adapter_gguf = adapter_map
        .parse()
        .with_context(|| format!("adapter {}", adapter.display()))?;
    let identity = file_identity(adapter)?;
    plan_lora_merge_into_shards(&shards, &adapter_gguf, &identity, scale, imatrix.as_ref())
        .with_context(|| format!("adapter {}", adapter.display()))
}

pub fn lora(command: &LoraCommand) -> anyhow::Result<()> {
    match command {
        LoraCommand::Merge {
            file,
            adapter,
            scale,
            imatrix,
            dry_run,
            json,
        } => {
            // Into a shard set, the merge is one set transaction over the shards that
            // hold the targets.
            let set = super::sets::open_for_rewrite(file, *dry_run)?;
            if set.is_none() {
                note_recovered(super::plan::prepare(file, *dry_run)?);
            }
            let LoraMergePlan {
                adapter_sha256,
                alpha,
                scale,
                tensors,
                ignored,
                rewrites,
            } = merge_plan(file, set.as_ref(), adapter, *scale, imatrix.as_deref())?;
            let label = format!("{} scale {scale}", merge_label(&adapter_sha256));
            let details = json!({"adapter_sha256": adapter_sha256, "alpha": alpha,
                "scale": scale, "tensors": tensors, "ignored": ignored});
            let into_set = set.is_some();
            drop(set);
            let applied = run_surgery(file, into_set, label, rewrites, &details, *dry_run, *json)?;
            let Some(transaction) = applied else {
                return Ok(());
            };
            if *json {
                let mut value = details;
                value["dry_run"] = json!(false);
                value["transaction"] = json!(transaction);
                println!("{value}");
                return Ok(());
            }
            for t in &tensors {
                println!(
                    "{} ({}, rank {}, factor {}): change rms {:.3e}; requantization rms {:.3e}, max {:.3e}; {} bytes change",
                    t.name,
                    t.ggml_type,
                    t.rank,
                    t.factor,
                    t.delta_rms,
                    t.requantization.rms,
                    t.requantization.max_abs,
                    t.changed_bytes
                );
            }
            for name in &ignored {
                println!("ignored (as llama.cpp does): {name}");
            }
            match transaction {
                Some(id) => println!(
                    "merged {} tensors as transaction {id}; `hotpatch lora unmerge {} {}` undoes it",
                    tensors.len(),
                    file.display(),
                    adapter.display()
                ),
                None => println!("nothing changed"),
            }
            Ok(())
        }
        LoraCommand::Unmerge {
            file,
            adapter,
            json,
            dry_run,
        } => {
            let identity = file_identity(adapter)?;
            if byte_tier::split::open_set_of(file)?.is_some() {
                return unmerge_shards(file, adapter, &identity, *dry_run, *json);
            }
            if *dry_run {
                let journal = byte_tier::Journal::open_read_only(file)?;
                let id = unified_manager::surgery::find_merge(&journal, &identity).with_context(
                    || {
                        format!(
                            "the journal of {} records no merge of {} that is still applied",
                            file.display(),
                            adapter.display()
                        )
                    },
                )?;
                let bytes = journal
                    .transaction(id)
                    .map_or(0, byte_tier::Transaction::bytes);
                // The merge is a live transaction: its revert goes through a live model
                // (which knows what lies over what), so the plan is that transaction's
                // live patches.
                let model = memory_tier::LiveModel::attach(file, memory_tier::AttachMode::Shared)?;
                let live = model.patches_of_transaction(id).len();
                let plan = json!({
                    "kind": "unmerge",
                    "file": file,
                    "merge_transaction": id,
                    "live_patches": live,
                    "bytes": bytes,
                });
                super::plan::report(&plan, live == 0, *json)?;
                return Ok(());
            }
            let done = unmerge(file, &identity)?;
            if *json {
                println!("{}", serde_json::to_string(&done)?);
            } else {
                println!(
                    "reverted merge transaction {} ({} bytes restored)",
                    done.merge_transaction, done.bytes
                );
            }
            Ok(())
        }
    }
}

/// `hotpatch lora unmerge` on a shard of several: the merge was a set transaction, and
/// its revert is one too (a dry run reports its writes).
fn unmerge_shards(
    file: &Path,
    adapter: &Path,
    identity: &str,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    if dry_run {
        let id = find_set_merge(file, identity)?;
        let parts = byte_tier::split::transaction::plan_set_revert(file, id)?;
        let plan = json!({
            "kind": "unmerge",
            "set": file,
            "merge_transaction": id,
            "shards": parts.iter().map(|p| json!({"shard": p.shard, "reverts": p.reverts,
                "writes": p.writes.len(),
                "bytes": p.writes.iter().map(|w| w.bytes.len()).sum::<usize>()}))
                .collect::<Vec<_>>(),
        });
        super::plan::report(&plan, parts.is_empty(), json)?;
        return Ok(());
    }
    let done =
        unmerge_set(file, identity).with_context(|| format!("unmerge {}", adapter.display()))?;
    if json {
        println!("{}", serde_json::to_string(&done)?);
    } else {
        println!(
            "reverted merge transaction {} of the set ({} bytes restored)",
            done.merge_transaction, done.bytes
        );
    }
    Ok(())
}

/// `hotpatch layers`.
#[derive(Debug, clap::Subcommand)]
pub enum LayersCommand {
    /// Insert copies of blocks A..B at block N (the passthrough self-merge): blocks are
    /// renumbered, block_count and every per-layer array updated, types kept (a rewrite).
    Duplicate {
        /// The model.
        file: PathBuf,
        /// The blocks to copy, A..B (A to B-1).
        #[arg(long, value_name = "A..B", value_parser = parse_layers)]
        layers: Range<u64>,
        /// Where the copies start in the result (0 to block_count).
        #[arg(long, value_name = "N")]
        at: u64,
        #[command(flatten)]
        output: Output,
    },
}

pub fn layers(command: &LayersCommand) -> anyhow::Result<()> {
    let LayersCommand::Duplicate {
        file,
        layers,
        at,
        output,
    } = command;
    if let Some(set) = super::sets::open_for_rewrite(file, output.dry_run)? {
        let parsed = set.parse_all()?;
        let plan = byte_tier::split::SetRewritePlan::new(
            &set,
            &parsed,
            output.output.as_deref(),
            |parsed, writers| duplicate_layers_of_set(parsed, writers, layers.clone(), *at),
        )?;
        let Some(outcome) = super::sets::run(plan, output)? else {
            return Ok(());
        };
        if output.json {
            println!("{}", super::sets::outcome_json(&outcome));
        } else {
            print_duplicated(&outcome.result);
            super::sets::print("", &outcome, false);
        }
        return Ok(());
    }
    note_recovered(super::plan::prepare(file, output.dry_run)?);
    let map = MappedFile::open(file)?;
    let gguf = map.parse()?;
    let plan = RewritePlan::new(file, output.output.as_deref(), &gguf, |gguf, writer| {
        duplicate_layers(gguf, writer, layers.clone(), *at)
    })?;
    let Some(outcome) = run_rewrite(plan, output)? else {
        return Ok(());
    };
    let report = &outcome.result;
    if output.json {
        println!(
            "{}",
            json!({"output": outcome.output, "report": report,
                "bytes_before": outcome.input_len, "bytes_after": outcome.bytes_written})
        );
    } else {
        print_duplicated(report);
        print_rewrite("", &outcome, false);
    }
    Ok(())
}

fn print_duplicated(report: &byte_tier::surgery::DuplicateReport) {
    println!(
        "copied blocks {}..{} to {}: blocks {} -> {}, {} tensors added, {} renumbered, per-layer arrays extended: {}",
        report.copied.start,
        report.copied.end,
        report.at,
        report.blocks_before,
        report.blocks_after,
        report.tensors_added.len(),
        report.tensors_renamed.len(),
        if report.arrays_extended.is_empty() {
            "none".to_owned()
        } else {
            report.arrays_extended.join(", ")
        }
    );
}

/// `hotpatch tensor copy SRC NAME DST [--as NEW] [--shard K] [-o OUT]`. SRC and DST
/// may be shards of sets: the tensor is read from the shard of SRC's set that holds
/// it, and a set DST gets a new set written (see [`copy_into_set`]).
pub fn copy(
    source: &Path,
    name: &str,
    destination: &Path,
    as_name: Option<&str>,
    shard: Option<u32>,
    output: &Output,
) -> anyhow::Result<()> {
    let holder = byte_tier::split::file_holding_tensor(source, name)?;
    let source_set = byte_tier::split::open_set_of(source)?;
    let first_source = match &source_set {
        Some(set) => set.files()[0].path().to_owned(),
        None => source.to_owned(),
    };
    let first_map = MappedFile::open(&first_source)?;
    let first_gguf = first_map
        .parse()
        .with_context(|| format!("source {}", first_source.display()))?;
    let source_map = MappedFile::open(&holder)?;
    let source_gguf = source_map
        .parse()
        .with_context(|| format!("source {}", holder.display()))?;
    let graft_source = GraftSource::new(&source_gguf, &holder, &first_gguf);
    if let Some(set) = byte_tier::split::open_set_of(destination)? {
        return copy_into_set(&set, &graft_source, name, as_name, shard, output);
    }
    if shard.is_some() {
        return Err(byte_tier::Error::InvalidEdit(format!(
            "--shard is for a shard set, and {} is a single file",
            destination.display()
        ))
        .into());
    }
    note_recovered(super::plan::prepare(destination, output.dry_run)?);
    let map = MappedFile::open(destination)?;
    let gguf = map.parse()?;
    let plan = RewritePlan::new(
        destination,
        output.output.as_deref(),
        &gguf,
        |gguf, writer| copy_tensor_from(&graft_source, name, gguf, writer, as_name),
    )?;
    let Some(outcome) = run_rewrite(plan, output)? else {
        return Ok(());
    };
    if output.json {
        print_rewrite("", &outcome, true);
        return Ok(());
    }
    let report = &outcome.result;
    print_graft(report);
    print_rewrite("", &outcome, false);
    Ok(())
}

fn print_graft(report: &GraftReport) {
    println!(
        "grafted {} as {} ({}, dims {:?}, {} bytes){}",
        report.source_name,
        report.name,
        report.ggml_type,
        report.dims,
        report.bytes,
        report
            .matched_sibling
            .as_ref()
            .map(|s| format!(", shape of {s}"))
            .unwrap_or_default()
    );
    for note in &report.notes {
        println!("note: {note}");
    }
}

/// A graft into the shard set `set`: a new set is written with OUT (`-o`, required) as
/// its prefix or its first shard's name, the tensor in shard `shard` (1-based; the
/// last by default), every shard's `split.tensors.count` one more.
fn copy_into_set(
    set: &byte_tier::split::ShardSet,
    source: &GraftSource<'_>,
    name: &str,
    as_name: Option<&str>,
    shard: Option<u32>,
    output: &Output,
) -> anyhow::Result<()> {
    let Some(out) = &output.output else {
        return Err(byte_tier::Error::InvalidEdit(format!(
            "{} is a shard set: the graft writes a new set, so give -o OUT (its prefix, \
             or its first shard's name)",
            set.files()[0].path().display()
        ))
        .into());
    };
    let count = set.files().len() as u32;
    let target = match shard {
        Some(0) => {
            return Err(byte_tier::Error::InvalidEdit(
                "--shard counts from 1, as the file names do".into(),
            )
            .into());
        }
        Some(k) => Some(k as usize - 1),
        None => None,
    };
    for file in set.files() {
        note_recovered(super::plan::prepare(file.path(), output.dry_run)?);
    }
    let shards = set.parse_all()?;
    let prefix = set_output_prefix(out, count)?;
    let plan = SetGraftPlan::new(set, &shards, source, name, as_name, target, &prefix)?;
    let report = plan.report().clone();
    let Some(files) = super::plan::run(plan, output.dry_run, output.json)? else {
        return Ok(());
    };
    if output.json {
        println!(
            "{}",
            json!({"dry_run": false, "graft": report, "files": files})
        );
        return Ok(());
    }
    print_graft(&report);
    for file in &files {
        println!(
            "wrote {} ({} tensors, {} bytes)",
            file.path.display(),
            file.n_tensors,
            file.n_bytes
        );
    }
    Ok(())
}
