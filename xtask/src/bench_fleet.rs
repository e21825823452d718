//! `cargo xtask bench-fleet`: what a fleet rollout costs, and how it grows with the fleet.
//!
//! Two fleets, each on its own three-member etcd cluster on loopback ports:
//!
//! 1. three replicas: `hotpatch serve --fleet` sidecars in front of llama-servers on
//!    copies of the real model (when `cargo xtask llama-server` and `cargo xtask
//!    real-model` have run);
//! 2. fifty members: sidecars each patching its own copy of the generated demo model,
//!    with no llama-server behind them (`--model-unverified`; the proxy is never asked
//!    to generate).
//!
//! On each, 20 rollouts alternate between applying a preset (the final norm scaled by
//! 0.5) and reverting it, driven in this process by `unified_manager::fleet::Fleet`. Per
//! rollout: the latency from the call to the last member's `done`, the skew between the
//! first and the last member applying, the etcd calls the coordinator made (counted in
//! its client) and the calls the whole cluster served meanwhile (every member's
//! `grpc_server_handled_total`, summed over the etcd members: the sidecars' watches,
//! puts and lease renewals included). A rollout that aborts is counted and its reason
//! printed, never retried in silence.
//!
//! Every child (etcd, llama-server, sidecar) is SIGKILLed when its guard drops, every
//! wait is bounded, and each sidecar writes its log to a file (a pipe nobody reads would
//! fill and stop it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use unified_manager::Preset;
use unified_manager::fleet::{Fleet, RolloutOptions};

const ROLLOUTS: usize = 20;
const FLEET: &str = "bench";
const LARGE: usize = 50;

const PRESET: &str = r#"
name = "halve-norm"
version = 1

[[memory_patch]]
name = "halve-output-norm"
tensor = "output_norm.weight"
transform = { scale = 0.5 }
"#;

/// A sidecar process, SIGKILLed when dropped.
struct Sidecar(Child);

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _already_exited = self.0.kill();
        let _reaped = self.0.wait();
    }
}

/// One fleet's figures.
struct Figures {
    members: usize,
    latency_ms: Vec<f64>,
    skew_ms: Vec<f64>,
    coordinator_requests: Vec<f64>,
    cluster_requests: Vec<f64>,
    aborted: Vec<String>,
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len().max(1) as f64
}

pub fn run() -> Result<()> {
    if crate::rerun_in_release("bench-fleet")? {
        return Ok(());
    }
    crate::run(crate::cargo().args([
        "build",
        "--quiet",
        "--release",
        "--package",
        "unified-manager",
        "--bin",
        "hotpatch",
    ]))?;
    let hotpatch = std::env::current_exe()?
        .parent()
        .context("the xtask binary has no folder")?
        .join("hotpatch");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = std::env::temp_dir().join(format!("hotpatch-bench-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| {
        let small = measure(&runtime, &hotpatch, &dir.join("small"), 3, true)?;
        report(&small);
        let large = measure(&runtime, &hotpatch, &dir.join("large"), LARGE, false)?;
        report(&large);
        growth(&small, &large);
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Sums every `grpc_server_handled_total` counter of every etcd member.
fn cluster_requests(etcd: &tests::EtcdCluster) -> f64 {
    etcd.client_ports
        .iter()
        .filter_map(|port| tests::http_request(*port, "GET", "/metrics", None).ok())
        .map(|(_, text)| {
            text.lines()
                .filter(|l| l.starts_with("grpc_server_handled_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        })
        .sum()
}

fn start_sidecar(
    hotpatch: &Path,
    dir: &Path,
    endpoints: &str,
    replica: &str,
    model: &Path,
    upstream: Option<u16>,
) -> Result<Sidecar> {
    let upstream_port = upstream.unwrap_or_else(tests::free_port);
    let log = std::fs::File::create(dir.join(format!("{replica}.log")))?;
    let mut command = Command::new(hotpatch);
    command
        .args([
            "serve",
            "--upstream",
            &format!("http://127.0.0.1:{upstream_port}"),
        ])
        .args(["--listen", &format!("127.0.0.1:{}", tests::free_port())])
        .arg("--model")
        .arg(model)
        .args(["--fleet", FLEET, "--etcd", endpoints, "--replica", replica])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    if upstream.is_none() {
        command.arg("--model-unverified");
    }
    Ok(Sidecar(command.spawn().context("start hotpatch serve")?))
}

fn measure(
    runtime: &tokio::runtime::Runtime,
    hotpatch: &Path,
    dir: &Path,
    members: usize,
    real: bool,
) -> Result<Figures> {
    std::fs::create_dir_all(dir)?;
    eprintln!(
        "bench-fleet: {members} members ({})",
        if real {
            "llama-server on copies of the real model"
        } else {
            "sidecars on copies of the demo model, no llama-server"
        }
    );
    let etcd = tests::EtcdCluster::start(3);
    let endpoints = etcd.endpoint_list();
    let mut models: Vec<PathBuf> = Vec::new();
    if real {
        let original = std::fs::read(tests::real_model())?;
        for i in 0..members {
            let path = dir.join(format!("replica{i}.gguf"));
            std::fs::write(&path, &original)?;
            models.push(path);
        }
    } else {
        for i in 0..members {
            let own = dir.join(format!("m{i:02}"));
            std::fs::create_dir_all(&own)?;
            models.push(unified_manager::demo::write_demo_model(
                &own,
                unified_manager::demo::DemoShape::default(),
            )?);
        }
    }
    let servers: Vec<tests::LlamaServer> = if real {
        models
            .iter()
            .map(|m| tests::LlamaServer::start(m, &[]))
            .collect()
    } else {
        Vec::new()
    };
    let mut sidecars = Vec::new();
    for (i, model) in models.iter().enumerate() {
        sidecars.push(start_sidecar(
            hotpatch,
            dir,
            &endpoints,
            &format!("m{i:02}"),
            model,
            servers.get(i).map(|s| s.port),
        )?);
    }
    // The etcd client's channels are made (lazily) inside the runtime.
    let _inside = runtime.enter();
    let fleet = Fleet::new(FLEET, &etcd.endpoints())?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let registered = runtime.block_on(fleet.members()).map_or(0, |m| m.len());
        if registered == members {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "{registered} of {members} sidecars registered in 120 s (logs in {})",
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let preset = Preset::from_toml("bench", PRESET)?;
    let options = RolloutOptions {
        prepare_timeout: Duration::from_secs(30),
        apply_timeout: Duration::from_secs(30),
        ..RolloutOptions::default()
    };
    let mut figures = Figures {
        members,
        latency_ms: Vec::new(),
        skew_ms: Vec::new(),
        coordinator_requests: Vec::new(),
        cluster_requests: Vec::new(),
        aborted: Vec::new(),
    };
    let mut applied = false;
    for round in 0..ROLLOUTS {
        let before = cluster_requests(&etcd);
        let started = Instant::now();
        let outcome = if applied {
            runtime.block_on(fleet.revert(None, &options))
        } else {
            runtime.block_on(fleet.apply(&preset, &options))
        };
        let elapsed = started.elapsed();
        match outcome {
            Ok(report) => {
                if !report.pending.is_empty() {
                    figures.aborted.push(format!(
                        "rollout {round}: committed, but {} had not applied after 30 s",
                        report.pending.join(", ")
                    ));
                }
                applied = !applied;
                figures.latency_ms.push(elapsed.as_secs_f64() * 1e3);
                figures.skew_ms.push(report.skew_ms as f64);
                figures
                    .coordinator_requests
                    .push(report.etcd_requests as f64);
                figures
                    .cluster_requests
                    .push(cluster_requests(&etcd) - before);
            }
            Err(error) => figures.aborted.push(format!("rollout {round}: {error}")),
        }
    }
    drop(sidecars);
    drop(servers);
    drop(etcd);
    Ok(figures)
}

fn report(f: &Figures) {
    println!(
        "{} members, {} rollouts committed, {} aborted or incomplete:",
        f.members,
        f.latency_ms.len(),
        f.aborted.len()
    );
    println!(
        "  latency    p50 {:8.1} ms   p99 {:8.1} ms",
        percentile(&f.latency_ms, 0.5),
        percentile(&f.latency_ms, 0.99)
    );
    println!(
        "  skew       p50 {:8.1} ms   p99 {:8.1} ms   (first to last member applying)",
        percentile(&f.skew_ms, 0.5),
        percentile(&f.skew_ms, 0.99)
    );
    println!(
        "  etcd calls per rollout: coordinator {:.1}, whole cluster {:.1}",
        mean(&f.coordinator_requests),
        mean(&f.cluster_requests)
    );
    for reason in &f.aborted {
        println!("  ! {reason}");
    }
}

fn growth(small: &Figures, large: &Figures) {
    let ratio = |a: f64, b: f64| b / a;
    println!(
        "from {} to {} members ({:.1}x): latency p50 {:.1}x, p99 {:.1}x; skew p50 {:.1}x; \
         coordinator etcd calls {:.1}x; cluster etcd calls {:.1}x",
        small.members,
        large.members,
        large.members as f64 / small.members as f64,
        ratio(
            percentile(&small.latency_ms, 0.5),
            percentile(&large.latency_ms, 0.5)
        ),
        ratio(
            percentile(&small.latency_ms, 0.99),
            percentile(&large.latency_ms, 0.99)
        ),
        ratio(
            percentile(&small.skew_ms, 0.5).max(1.0),
            percentile(&large.skew_ms, 0.5)
        ),
        ratio(
            mean(&small.coordinator_requests),
            mean(&large.coordinator_requests)
        ),
        ratio(mean(&small.cluster_requests), mean(&large.cluster_requests)),
    );
}
