//! `hotpatch fleet members|status|history|apply|revert NAME --etcd URL[,URL…]`: glue
//! over `unified_manager::fleet::Fleet`.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use unified_manager::Preset;
use unified_manager::fleet::coordinator::{FleetStatus, HistoryEntry};
use unified_manager::fleet::{
    Decision, EtcdTls, Fleet, MemberRecord, PrepareVerdict, RolloutKind, RolloutOptions,
    RolloutReport,
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
}

impl RolloutArgs {
    fn options(&self) -> RolloutOptions {
        RolloutOptions {
            prepare_timeout: Duration::from_secs(self.prepare_timeout_secs),
            apply_timeout: Duration::from_secs(self.apply_timeout_secs),
            drain: self.drain,
        }
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
    /// all prepare, then all commit, or nothing changes.
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
            let report = fleet.fleet()?.apply(&preset, &rollout.options()).await?;
            print_report(&report, fleet.json)?;
        }
        FleetCommand::Revert {
            fleet,
            rollout_id,
            rollout,
        } => {
            let report = fleet
                .fleet()?
                .revert(rollout_id.as_deref(), &rollout.options())
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
        }
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
            "  {}  {}  {} members, {} done  {outcome}",
            entry.spec.id,
            describe_action(&entry.spec.action),
            entry.spec.members.len(),
            entry.done
        );
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
        match &m.done {
            Some(done) => println!("  {}: done (epoch {})", m.replica, done.epoch),
            None => println!(
                "  {}: not applied yet (it converges when it is back)",
                m.replica
            ),
        }
    }
    Ok(())
}
