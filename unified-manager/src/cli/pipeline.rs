//! `hotpatch safety|optimize|boost FILE`: the coordinated pipelines.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use memory_tier::AttachMode;
use unified_manager::{
    BoostOptions, ConfigDir, Manager, OptimizeOptions, PipelineReport, Repair, SafetyOptions,
    StepResult,
};

use super::progress::{bytes_bar, reporter, spinner};

/// How to reach a running `hotpatch serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct ServerArgs {
    /// The proxy's address (`http://127.0.0.1:8080`) for server steps; the configured
    /// `server_url` when given without a value.
    #[arg(long, value_name = "URL", num_args = 0..=1, default_missing_value = "")]
    pub server: Option<String>,
    /// The file holding the admin API's bearer token.
    #[arg(long, value_name = "FILE")]
    pub admin_token_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust, besides the system's, when the proxy
    /// serves HTTPS with a certificate a private CA signed.
    #[arg(long, value_name = "FILE")]
    pub admin_ca: Option<PathBuf>,
}

/// The configuration directory option.
#[derive(Debug, Clone, clap::Args)]
pub struct ConfigDirArg {
    /// The configuration directory (default: $HOTPATCH_CONFIG_DIR, else
    /// $XDG_CONFIG_HOME/hotpatch, else ~/.config/hotpatch).
    #[arg(long, value_name = "DIR")]
    pub config_dir: Option<PathBuf>,
}

impl ConfigDirArg {
    pub fn open(&self) -> anyhow::Result<ConfigDir> {
        Ok(match &self.config_dir {
            Some(dir) => ConfigDir::new(dir),
            None => ConfigDir::default_location()?,
        })
    }
}

/// Attaches the server the arguments name to `manager`, if any.
pub fn attach_server(
    manager: &Manager,
    server: &ServerArgs,
    config: &ConfigDir,
) -> anyhow::Result<()> {
    let Some(url) = &server.server else {
        return Ok(());
    };
    let settings = config.settings()?;
    let url = if url.is_empty() {
        settings
            .server_url
            .clone()
            .context("--server was given without a URL and no server_url is configured")?
    } else {
        url.clone()
    };
    let token_file = server
        .admin_token_file
        .clone()
        .or(settings.admin_token_file.clone());
    let token = match token_file {
        Some(path) => Some(
            std::fs::read_to_string(&path)
                .with_context(|| format!("read the admin token from {}", path.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    manager.attach_server(Arc::new(super::admin_client(
        &url,
        token,
        server.admin_ca.as_deref(),
    )?));
    Ok(())
}

/// The end of a planned pipeline: the applied report, or with --dry-run (nothing
/// applied) the planned one, whose table follows the plan in text mode.
fn report_planned(
    applied: Option<PipelineReport>,
    planned: &PipelineReport,
    json: bool,
) -> anyhow::Result<()> {
    match applied {
        Some(report) => print_report(&report, json),
        None => {
            if !json {
                print_report(planned, false)?;
            }
            check_report(planned)
        }
    }
}

/// Prints a pipeline report as a table (or JSON) and fails when a step failed.
pub fn print_report(report: &PipelineReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        println!(
            "{} pipeline on {}{}",
            report.pipeline,
            report.target.display(),
            if report.dry_run {
                " (dry run: nothing written)"
            } else {
                ""
            }
        );
        for step in &report.steps {
            let status = match &step.result {
                StepResult::Ok => "ok".to_owned(),
                StepResult::Skipped(why) => format!("skipped: {why}"),
                StepResult::Failed(why) => format!("FAILED: {why}"),
            };
            println!(
                "  {:<14} {:<7} {:>12} B {:>10.1} ms  {}",
                step.step,
                format!("{:?}", step.tier).to_lowercase(),
                step.bytes,
                step.duration_ms,
                step.changed
            );
            println!("  {:<14} {status}", "");
        }
        let undo = &report.undo;
        if let Some(t) = undo.journal_transaction {
            println!(
                "undo the writes: hotpatch revert {} {t}",
                report.target.display()
            );
        }
        if let Some(t) = undo.set_transaction {
            println!(
                "undo the writes: hotpatch revert --set {} {t}",
                report.target.display()
            );
        }
        if !undo.server_rules.is_empty() {
            println!("server rules added: {}", undo.server_rules.join(", "));
        }
        if let Some((path, _)) = &undo.output {
            println!("undo: remove {}", path.display());
        }
    }
    check_report(report)
}

/// Fails when a step failed or a problem was left unresolved.
fn check_report(report: &PipelineReport) -> anyhow::Result<()> {
    if !report.succeeded() {
        anyhow::bail!(
            "the {} pipeline stopped at a failed step; what it did was undone",
            report.pipeline
        );
    }
    if !report.unresolved.is_empty() {
        anyhow::bail!("left unresolved: {}", report.unresolved.join("; "));
    }
    Ok(())
}

/// Arguments of `hotpatch safety`.
#[derive(Debug, clap::Args)]
pub struct SafetyArgs {
    /// The model file (changed in place through the journal; a running llama-server
    /// that maps it sees the repairs).
    pub file: PathBuf,
    /// Repair NaN and infinity: `zero`, or `clamp` (infinity to the tensor's largest
    /// finite magnitude, NaN to zero).
    #[arg(long, value_parser = parse_repair)]
    pub repair: Option<Repair>,
    /// Clamp each tensor's values into mean +/- K standard deviations.
    #[arg(long, value_name = "K")]
    pub outlier_sigmas: Option<f32>,
    /// A manifest (from `hotpatch verify --write-manifest` or gguf-hash) the file must
    /// match before anything is written.
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// An importance matrix (llama-imatrix's GGUF or legacy .dat output): fixed rows
    /// are requantized with its weights, as llama-quantize --imatrix does, and the
    /// types ggml quantizes only with weights (IQ1_S, IQ2_XXS, IQ2_XS) can be fixed.
    #[arg(long, value_name = "FILE")]
    pub imatrix: Option<PathBuf>,
    /// With a server: the token cap of the default rules.
    #[arg(long, value_name = "N")]
    pub max_tokens: Option<u64>,
    /// With a server: a literal string to redact from responses (repeatable).
    #[arg(long, value_name = "TEXT")]
    pub redact: Vec<String>,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub config: ConfigDirArg,
    /// Plan and report; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_repair(text: &str) -> Result<Repair, String> {
    match text {
        "zero" => Ok(Repair::Zero),
        "clamp" => Ok(Repair::Clamp),
        other => Err(format!("{other:?}: expected zero or clamp")),
    }
}

pub fn safety(args: &SafetyArgs) -> anyhow::Result<()> {
    let config = args.config.open()?;
    let settings = config.settings()?;
    let manager = Manager::new();
    attach_server(&manager, &args.server, &config)?;
    let mut server = settings.safety.server.clone();
    if let Some(n) = args.max_tokens {
        server.max_tokens = n;
    }
    server.redact.extend(args.redact.iter().cloned());
    let manifest = match &args.manifest {
        Some(path) => Some(
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))?,
        ),
        None => None,
    };
    let options = SafetyOptions {
        repair: args.repair.or(settings.safety.repair),
        outlier_sigmas: args.outlier_sigmas.or(settings.safety.outlier_sigmas),
        manifest,
        server: Some(server),
        imatrix: match &args.imatrix {
            Some(path) => Some(std::sync::Arc::new(
                byte_tier::imatrix::ImportanceMatrix::read(path)
                    .with_context(|| format!("read {}", path.display()))?,
            )),
            None => None,
        },
        dry_run: args.dry_run,
    };
    if let Some(set) = super::sets::open_for_rewrite(&args.file, args.dry_run)? {
        // A shard of several (each shard's unfinished transaction recovered first): the
        // whole set is scanned, and repaired as one set transaction.
        let size = set.files().iter().map(|f| f.bytes().len() as u64).sum();
        drop(set);
        let spinner = spinner("safety: scanning and planning the set", size);
        let plan = manager.plan_safety_of_set(&args.file, &options);
        spinner.finish_and_clear();
        let plan = plan?;
        let planned = plan.report.clone();
        let applied = super::plan::run(plan.on(&manager, &options), args.dry_run, args.json);
        return report_planned(applied?, &planned, args.json);
    }
    let mode = if args.dry_run {
        AttachMode::Private
    } else {
        AttachMode::Shared
    };
    let id = manager
        .attach(&args.file, mode)
        .with_context(|| format!("attach {}", args.file.display()))?;
    let spinner = spinner(
        "safety: scanning and planning",
        std::fs::metadata(&args.file)?.len(),
    );
    // Planned once (on a private view for a dry run: no journal is opened); the plan
    // is what a dry run reports, and what is written otherwise.
    let plan = manager.plan_safety(id, &options);
    spinner.finish_and_clear();
    let plan = plan?;
    let planned = plan.report.clone();
    let applied = super::plan::run(plan.on(&manager, &options), args.dry_run, args.json);
    manager.detach_all(false)?;
    report_planned(applied?, &planned, args.json)
}

/// Arguments of `hotpatch optimize`.
#[derive(Debug, clap::Args)]
pub struct OptimizeArgs {
    /// The model file (never changed).
    pub file: PathBuf,
    /// Requantize tensors whose names match this regular expression ...
    #[arg(long, value_name = "REGEX", requires = "to")]
    pub tensors: Option<String>,
    /// ... to this type (Q8_0, Q4_K, F16, ...).
    #[arg(long, value_name = "TYPE", value_parser = super::structure::parse_ggml_type, requires = "tensors")]
    pub to: Option<byte_tier::GgmlType>,
    /// Blocks to remove, comma-separated (0-based).
    #[arg(long, value_delimiter = ',')]
    pub prune: Vec<u64>,
    /// An importance matrix (llama-imatrix's GGUF or legacy .dat output) for the
    /// requantization, applied as llama-quantize --imatrix does.
    #[arg(long, value_name = "FILE", requires = "tensors")]
    pub imatrix: Option<PathBuf>,
    /// The file to write (default: FILE with `.optimized.gguf`).
    #[arg(short, long, value_name = "OUT")]
    pub output: Option<PathBuf>,
    /// Plan and report sizes; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

fn default_output(file: &Path) -> PathBuf {
    let stem = file
        .file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned());
    file.with_file_name(format!("{stem}.optimized.gguf"))
}

pub fn optimize(args: &OptimizeArgs) -> anyhow::Result<()> {
    let requantize = match (&args.tensors, args.to) {
        (Some(pattern), Some(to)) => Some((regex::Regex::new(pattern)?, to)),
        _ => None,
    };
    if let Some(set) = super::sets::open_for_rewrite(&args.file, args.dry_run)? {
        return optimize_set(args, &set, requantize);
    }
    let options = OptimizeOptions {
        output: args
            .output
            .clone()
            .unwrap_or_else(|| default_output(&args.file)),
        requantize,
        prune: args.prune.clone(),
        dry_run: args.dry_run,
        imatrix: match &args.imatrix {
            Some(path) => Some(std::sync::Arc::new(
                byte_tier::imatrix::ImportanceMatrix::read(path)?,
            )),
            None => None,
        },
    };
    let manager = Manager::new();
    // The requantization and the prune run once, into a rewrite plan: what a dry run
    // reports, and what is written otherwise (refused if the input changed since).
    let map = byte_tier::MappedFile::open(&args.file)?;
    let gguf = map.parse()?;
    let bar = bytes_bar("optimizing", gguf.file_len());
    let plan = manager
        .plan_optimize(&args.file, &gguf, &options)?
        .with_progress(reporter(&bar));
    let planned = plan.report().clone();
    let applied = super::plan::run(plan, args.dry_run, args.json);
    bar.finish_and_clear();
    report_planned(applied?, &planned, args.json)
}

/// Arguments of `hotpatch boost`.
#[derive(Debug, clap::Args)]
pub struct BoostArgs {
    /// The model file.
    pub file: PathBuf,
    /// Also lock the pages in memory (held while this command runs; see --hold).
    #[arg(long)]
    pub mlock: bool,
    /// Advise transparent huge pages.
    #[arg(long)]
    pub huge_pages: bool,
    /// Do not drop the file from the page cache to time a cold read first (use on a
    /// file a busy server is reading).
    #[arg(long)]
    pub no_cold_read: bool,
    /// Turn the server's response cache on (with --server).
    #[arg(long)]
    pub server_cache: bool,
    /// Keep the boost (page lock, advice) for this many seconds before exiting.
    #[arg(long, value_name = "SECONDS", default_value_t = 0)]
    pub hold: u64,
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub config: ConfigDirArg,
    /// Say what would be done; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn boost(args: &BoostArgs) -> anyhow::Result<()> {
    let config = args.config.open()?;
    let manager = Manager::new();
    attach_server(&manager, &args.server, &config)?;
    let options = BoostOptions {
        measure_cold: !args.no_cold_read,
        mlock: args.mlock,
        huge_pages: args.huge_pages,
        server_cache: args.server_cache,
        dry_run: args.dry_run,
    };
    let report = manager.boost(&args.file, &options)?;
    let printed = print_report(&report, args.json);
    if printed.is_ok() && args.hold > 0 && !args.dry_run {
        eprintln!("holding the boost for {} s", args.hold);
        std::thread::sleep(std::time::Duration::from_secs(args.hold));
    }
    if let Some(id) = report.undo.boost {
        manager.release_boost(id)?;
    }
    printed
}

/// What `optimize` did to a shard set.
#[derive(Debug, serde::Serialize)]
struct OptimizedSet {
    pruned: Option<byte_tier::edit::PruneReport>,
    requantized: Vec<byte_tier::edit::Requantized>,
}

/// `hotpatch optimize` given a shard of several: the requantization and the prune as one
/// rewrite of the whole set into a new set (`-o OUT`, by default `PREFIX.optimized`),
/// all shards or none, as `requantize` and `prune` do on a set.
fn optimize_set(
    args: &OptimizeArgs,
    set: &byte_tier::split::ShardSet,
    requantize: Option<(regex::Regex, byte_tier::GgmlType)>,
) -> anyhow::Result<()> {
    if args.prune.is_empty() && requantize.is_none() {
        anyhow::bail!("nothing to do: ask for a requantization, a prune, or both");
    }
    let output = match &args.output {
        Some(out) => out.clone(),
        None => {
            let mut name = set.prefix().as_os_str().to_owned();
            name.push(".optimized");
            PathBuf::from(name)
        }
    };
    let count = set.files().len() as u32;
    if byte_tier::split::output_prefix(&output, count) == set.prefix() {
        anyhow::bail!(
            "optimize writes a new set: give an output other than the input (a running \
             server maps the input, and a rewrite under it is never safe)"
        );
    }
    let imatrix = match &args.imatrix {
        Some(path) => Some(byte_tier::imatrix::ImportanceMatrix::read(path)?),
        None => None,
    };
    let parsed = set.parse_all()?;
    let plan =
        byte_tier::split::SetRewritePlan::new(set, &parsed, Some(&output), |parsed, writers| {
            if let Some(m) = &imatrix {
                m.check_shards(parsed)?;
            }
            // Requantize first, under the input's names (which the matrix uses), then prune.
            let mut requantized = Vec::new();
            if let Some((pattern, target)) = &requantize {
                let select = |name: &str| pattern.is_match(name);
                for (gguf, writer) in parsed.iter().zip(writers.iter_mut()) {
                    requantized.extend(byte_tier::edit::requantize_tensors_of_shard(
                        gguf,
                        writer,
                        &select,
                        *target,
                        imatrix.as_ref(),
                    )?);
                }
            }
            let pruned = if args.prune.is_empty() {
                None
            } else {
                let report =
                    byte_tier::edit::prune_layers_of_set(&parsed[0], writers, &args.prune)?;
                requantized.retain(|r| !report.tensors_removed.contains(&r.name));
                Some(report)
            };
            Ok(OptimizedSet {
                pruned,
                requantized,
            })
        })?;
    let output_args = super::meta::Output {
        output: Some(output),
        dry_run: args.dry_run,
        json: args.json,
    };
    let Some(outcome) = super::sets::run(plan, &output_args)? else {
        return Ok(());
    };
    if !args.json {
        let report = &outcome.result;
        if let Some(p) = &report.pruned {
            println!(
                "prune: blocks {} -> {}: {} tensors removed, {} renumbered",
                p.blocks_before,
                p.blocks_after,
                p.tensors_removed.len(),
                p.tensors_renamed.len()
            );
        }
        if let Some((_, target)) = &requantize {
            let before: u64 = report.requantized.iter().map(|r| r.bytes_before).sum();
            let after: u64 = report.requantized.iter().map(|r| r.bytes_after).sum();
            println!(
                "requantize: {} tensors to {}: {before} -> {after} bytes",
                report.requantized.len(),
                target.name()
            );
        }
    }
    super::sets::print("optimize: ", &outcome, args.json);
    Ok(())
}
