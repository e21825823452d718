//! `hotpatch fleet members|status|history|apply|revert NAME --etcd URL[,URL…]`: glue
//! over `unified_manager::fleet::Fleet`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use unified_manager::Preset;
use unified_manager::fleet::coordinator::RollingProgress;
use unified_manager::fleet::coordinator::{FleetStatus, HistoryEntry};
use unified_manager::fleet::{
    Decision, EtcdTls, Fleet, HealthCheck, HealthExpect, MemberRecord, PrepareVerdict, RolloutKind,
    RolloutOptions, RolloutReport,
};

use super::pipeline::ConfigDirArg;

/// The fleet and its etcd cluster.
#[derive(Debug, clap::Args)]
pub struct FleetArgs {
    /// The fleet's name.
    pub name: String,
    /// The etcd endpoints (`http://host:port`, comma-separated).
    #[arg(
        long,
        value_name = "URL[,URL…]",
        value_delimiter = ',',
        required = true
    )]
    pub etcd: Vec<String>,
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl FleetArgs {
    /// The fleet on its etcd cluster (nothing is contacted yet).
    fn fleet(&self) -> unified_manager::Result<Fleet> {
        Fleet::with_tls(&self.name, &self.etcd, &self.tls.tls())
    }
}

/// TLS for the etcd connection (`https://` endpoints).
#[derive(Debug, Clone, clap::Args)]
pub struct EtcdTlsArgs {
    /// PEM file of the CA that signed the etcd members' certificates (default: the
    /// system's roots).
    #[arg(long, value_name = "FILE")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM file of the client certificate for an etcd cluster that checks clients
    /// (`--client-cert-auth`).
    #[arg(long, value_name = "FILE", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdTlsArgs {
    /// The library's TLS options.
    pub fn tls(&self) -> EtcdTls {
        EtcdTls {
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
        }
    }
}

/// `hotpatch serve`'s fleet membership flags.
#[derive(Debug, clap::Args)]
pub struct FleetMemberArgs {
    /// Join this fleet (kept in etcd): register, converge to its desired state before
    /// serving generation requests (503 until then), and take part in its rollouts.
    #[arg(long, value_name = "NAME", requires_all = ["etcd", "model"])]
    pub fleet: Option<String>,
    /// The fleet's etcd endpoints (`http://host:port`, comma-separated).
    #[arg(
        long,
        value_name = "URL[,URL…]",
        value_delimiter = ',',
        requires = "fleet"
    )]
    pub etcd: Vec<String>,
    #[command(flatten)]
    pub tls: EtcdTlsArgs,
    /// This replica's id in the fleet (default: `replica-PORT`).
    #[arg(long, value_name = "ID", requires = "fleet")]
    pub replica: Option<String>,
    /// Seconds the fleet registration outlives this process (etcd's minimum is 2).
    #[arg(long, value_name = "SECS", default_value_t = 5, requires = "fleet")]
    pub fleet_lease_ttl_secs: i64,
}

/// How a rollout runs.
#[derive(Debug, clap::Args)]
#[command(group(
    clap::ArgGroup::new("health_expect")
        .args(["health_expect_contains", "health_expect_regex", "health_expect_pointer"])
        .multiple(false)
))]
pub struct RolloutArgs {
    /// Seconds members have to prepare before the rollout is aborted.
    #[arg(long, value_name = "SECS", default_value_t = 30)]
    pub prepare_timeout_secs: u64,
    /// Seconds to wait for members to apply after the commit.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub apply_timeout_secs: u64,
    /// Drain every member (hold new requests, wait for in-flight ones) while it applies.
    #[arg(long)]
    pub drain: bool,
    /// Apply one member at a time (in replica-id order) after all have prepared; after
    /// each, send the health check to its proxy and go on only when the answer passes.
    /// A failed check, or a member that does not apply within --apply-timeout-secs,
    /// reverts the members already done, records the rollout as rolled back with the
    /// reason, and exits 1.
    #[arg(long, requires_all = ["health_request", "health_expect"])]
    pub rolling: bool,
    /// The health check's request: JSON `{"path": "/completion", "body": {...}}`, or a
    /// file holding it. It is sent as a POST to each member's proxy with `temperature`
    /// 0 and `cache_prompt` false.
    #[arg(long, value_name = "FILE|JSON", requires = "rolling")]
    pub health_request: Option<String>,
    /// Pass when the generated text (`content`, `choices[0].message.content` or
    /// `choices[0].text`; else the whole body) contains TEXT.
    #[arg(long, value_name = "TEXT", requires = "rolling")]
    pub health_expect_contains: Option<String>,
    /// Pass when the generated text matches the regular expression RE.
    #[arg(long, value_name = "RE", requires = "rolling")]
    pub health_expect_regex: Option<String>,
    /// Pass when the answer's JSON value at POINTER (RFC 6901) equals JSON, e.g.
    /// `/stop_type="limit"`.
    #[arg(long, value_name = "POINTER=JSON", requires = "rolling")]
    pub health_expect_pointer: Option<String>,
    /// Seconds each health check's answer may take.
    #[arg(long, value_name = "SECS", default_value_t = 60)]
    pub health_timeout_secs: u64,
}

/// The request part of `--health-request`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthRequest {
    path: String,
    body: serde_json::Value,
}

impl RolloutArgs {
    fn options(&self) -> anyhow::Result<RolloutOptions> {
        Ok(RolloutOptions {
            prepare_timeout: Duration::from_secs(self.prepare_timeout_secs),
            apply_timeout: Duration::from_secs(self.apply_timeout_secs),
            drain: self.drain,
            rolling: if self.rolling {
                Some(self.health_check()?)
            } else {
                None
            },
        })
    }

    fn health_check(&self) -> anyhow::Result<HealthCheck> {
        let given = self
            .health_request
            .as_deref()
            .context("--rolling needs --health-request")?;
        let text = if given.trim_start().starts_with('{') {
            given.to_owned()
        } else {
            std::fs::read_to_string(given).with_context(|| format!("read {given}"))?
        };
        let request: HealthRequest = serde_json::from_str(&text)
            .context("--health-request: expected {\"path\": \"/…\", \"body\": {…}}")?;
        let expect = if let Some(text) = &self.health_expect_contains {
            HealthExpect::Contains { text: text.clone() }
        } else if let Some(pattern) = &self.health_expect_regex {
            HealthExpect::Regex {
                pattern: pattern.clone(),
            }
        } else if let Some(pair) = &self.health_expect_pointer {
            let (pointer, value) = pair
                .split_once('=')
                .context("--health-expect-pointer: expected POINTER=JSON")?;
            HealthExpect::Pointer {
                pointer: pointer.to_owned(),
                equals: serde_json::from_str(value)
                    .with_context(|| format!("--health-expect-pointer: {value:?} is not JSON"))?,
            }
        } else {
            anyhow::bail!(
                "--rolling needs one of --health-expect-contains, --health-expect-regex, --health-expect-pointer"
            );
        };
        let check = HealthCheck {
            path: request.path,
            body: request.body,
            expect,
            timeout_ms: self.health_timeout_secs.saturating_mul(1000),
        };
        check.validate().map_err(anyhow::Error::msg)?;
        Ok(check)
    }
}

/// `hotpatch fleet …`.
#[derive(Debug, clap::Subcommand)]
pub enum FleetCommand {
    /// List the members registered (replica, upstream, model header, applied revision).
    Members(FleetArgs),
    /// The desired state, the members and the rollout in flight.
    Status(FleetArgs),
    /// Every rollout recorded, with its decision.
    History(FleetArgs),
    /// Roll a preset (a stored preset's name, or a preset TOML file) out to every member:
    /// all prepare, then all commit, or nothing changes. With --rolling, one member at a
    /// time behind a health check, rolled back on a failure.
    Apply {
        #[command(flatten)]
        fleet: FleetArgs,
        /// A stored preset's name or a preset file.
        preset: String,
        #[command(flatten)]
        config: ConfigDirArg,
        #[command(flatten)]
        rollout: RolloutArgs,
    },
    /// Undo a rollout fleet-wide (the last one committed when none is named), in the same
    /// two phases.
    Revert {
        #[command(flatten)]
        fleet: FleetArgs,
        /// The rollout to undo.
        rollout_id: Option<String>,
        #[command(flatten)]
        rollout: RolloutArgs,
    },
}

/// Runs a `hotpatch fleet` command.
pub fn run(command: &FleetCommand) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(run_async(command))
}

async fn run_async(command: &FleetCommand) -> anyhow::Result<()> {
    match command {
        FleetCommand::Members(args) => {
            let members = args.fleet()?.members().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&members)?);
            } else {
                print_members(&args.name, &members);
            }
        }
        FleetCommand::Status(args) => {
            let status = args.fleet()?.status().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print_status(&status);
            }
        }
        FleetCommand::History(args) => {
            let history = args.fleet()?.history().await?;
            if args.json {
                println!("{}", serde_json::to_string_pretty(&history)?);
            } else {
                print_history(&args.name, &history);
            }
        }
        FleetCommand::Apply {
            fleet,
            preset,
            config,
            rollout,
        } => {
            let preset = load_preset(preset, config)?;
            let options = rollout.options()?;
            let report = fleet.fleet()?.apply(&preset, &options).await?;
            print_report(&report, fleet.json)?;
        }
        FleetCommand::Revert {
            fleet,
            rollout_id,
            rollout,
        } => {
            let options = rollout.options()?;
            let report = fleet
                .fleet()?
                .revert(rollout_id.as_deref(), &options)
                .await?;
            print_report(&report, fleet.json)?;
        }
    }
    Ok(())
}

fn load_preset(preset: &str, config: &ConfigDirArg) -> anyhow::Result<Preset> {
    let path = PathBuf::from(preset);
    if path.is_file() {
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        return Ok(Preset::from_toml(&path.display().to_string(), &text)?);
    }
    Ok(config.open()?.load_preset(preset)?)
}

fn describe_action(action: &RolloutKind) -> String {
    match action {
        RolloutKind::Apply { preset } => {
            format!("apply preset {} v{}", preset.name, preset.version)
        }
        RolloutKind::Revert { target } => format!("revert rollout {target}"),
    }
}

fn print_members(fleet: &str, members: &[MemberRecord]) {
    println!("fleet {fleet}: {} members", members.len());
    for m in members {
        println!(
            "  {}  upstream {}  listen {}  model {}  revision {}  epoch {}{}",
            m.replica,
            m.upstream,
            m.listen,
            &m.model_sha256[..m.model_sha256.len().min(16)],
            m.applied_revision,
            m.epoch,
            m.error
                .as_ref()
                .map(|e| format!("  error: {e}"))
                .unwrap_or_default()
        );
    }
}

fn print_status(status: &FleetStatus) {
    println!(
        "fleet {}: desired revision {} ({} patch sets)",
        status.fleet,
        status.desired.revision,
        status.desired.rollouts.len()
    );
    for r in &status.desired.rollouts {
        println!("  {}  preset {} v{}", r.id, r.preset.name, r.preset.version);
    }
    print_members(&status.fleet, &status.members);
    match &status.active {
        None => println!("no rollout in flight"),
        Some(active) => {
            println!(
                "rollout {} in flight: {} ({}), {} of {} prepared, {} done",
                active.spec.id,
                describe_action(&active.spec.action),
                active.phase,
                active.prepared.len(),
                active.spec.members.len(),
                active.done.len()
            );
            for (replica, verdict) in &active.prepared {
                println!("  {replica}: {}", describe_verdict(verdict));
            }
            if let Some(progress) = &active.rolling {
                print_progress(progress, active.spec.members.len());
            }
        }
    }
}

fn print_progress(progress: &RollingProgress, members: usize) {
    println!(
        "  rolling: {} of {members} let apply, {} applied, {} passed the health check{}",
        progress.admitted.len(),
        progress.applied.len(),
        progress.health.values().filter(|h| h.passed).count(),
        if progress.driven {
            ""
        } else {
            " (no coordinator drives it now: the next `hotpatch fleet` call resumes it)"
        }
    );
    for replica in &progress.admitted {
        let health = match progress.health.get(replica) {
            None => "not checked".to_owned(),
            Some(h) if h.passed => format!("health passed ({} ms)", h.latency_ms),
            Some(h) => format!("health failed: {}", h.detail),
        };
        let reverted = if progress.reverted.contains(replica) {
            ", reverted"
        } else {
            ""
        };
        println!("    {replica}: {health}{reverted}");
    }
}

fn describe_verdict(verdict: &PrepareVerdict) -> String {
    match verdict {
        PrepareVerdict::Ready => "ready".into(),
        PrepareVerdict::Refused { reason } => format!("refused: {reason}"),
    }
}

fn print_history(fleet: &str, history: &[HistoryEntry]) {
    println!("fleet {fleet}: {} rollouts", history.len());
    for entry in history {
        let outcome = match &entry.decision {
            None => "no decision".to_owned(),
            Some(Decision::Commit { revision, .. }) => format!("committed (revision {revision})"),
            Some(Decision::Abort { reason, .. }) => format!("aborted: {reason}"),
        };
        println!(
            "  {}  {}{}  {} members, {} done  {outcome}",
            entry.spec.id,
            describe_action(&entry.spec.action),
            if entry.rolling.is_some() {
                " (rolling)"
            } else {
                ""
            },
            entry.spec.members.len(),
            entry.done
        );
        if let Some(progress) = &entry.rolling {
            print_progress(progress, entry.spec.members.len());
            if let Some(rollback) = &progress.rollback {
                println!(
                    "    rolled back: reverted on [{}], still holding [{}]",
                    rollback.reverted.join(", "),
                    rollback.pending.join(", ")
                );
            }
        }
    }
}

fn print_report(report: &RolloutReport, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    if let Some(settled) = &report.settled_first {
        println!("first settled the rollout left in flight: {settled}");
    }
    println!(
        "fleet {}: rollout {} ({}) committed at revision {}; prepare {} ms, total {} ms, skew {} ms, {} etcd requests",
        report.fleet,
        report.id,
        describe_action(&report.action),
        report.revision,
        report.prepare_ms,
        report.total_ms,
        report.skew_ms,
        report.etcd_requests
    );
    for m in &report.members {
        let health = match &m.health {
            Some(h) if h.passed => format!(", health passed ({} ms)", h.latency_ms),
            Some(h) => format!(", health failed: {}", h.detail),
            None => String::new(),
        };
        match &m.done {
            Some(done) => println!("  {}: done (epoch {}){health}", m.replica, done.epoch),
            None => println!(
                "  {}: not applied yet (it converges when it is back)",
                m.replica
            ),
        }
    }
    Ok(())
}
