//! Fleets on a real etcd cluster: three etcd members on loopback ports, `hotpatch serve
//! --fleet` sidecars on copies of the real model, and `hotpatch fleet` as the
//! coordinator, each run as a user runs it. The faults are real too: SIGKILLed
//! sidecars, a SIGKILLed etcd leader, a coordinator that dies between prepare and
//! commit (a fail point that aborts the process as a kill does).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");
const FLEET: &str = "show";

/// The preset every rollout here applies: the final norm halved, which changes every
/// token's probabilities.
const HALVE_NORM: &str = r#"
name = "halve-norm"
version = 1

[[memory_patch]]
name = "halve-output-norm"
tensor = "output_norm.weight"
transform = { scale = 0.5 }

[[server_rule]]
name = "cap"
action = { type = "clamp", key = "n_predict", max = 64.0 }
"#;

/// A preset no model accepts: its tensor does not exist.
const NO_SUCH_TENSOR: &str = r#"
name = "missing"
version = 1

[[memory_patch]]
name = "scale-nothing"
tensor = "no.such.tensor"
transform = { scale = 2.0 }
"#;

fn fleet(etcd: &str, args: &[&str]) -> Output {
    Command::new(HOTPATCH)
        .arg("fleet")
        .args(args)
        .args(["--etcd", etcd])
        .output()
        .unwrap()
}

fn fleet_ok(etcd: &str, args: &[&str]) -> String {
    let output = fleet(etcd, args);
    assert!(
        output.status.success(),
        "hotpatch fleet {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn fleet_error(etcd: &str, args: &[&str]) -> String {
    let output = fleet(etcd, args);
    assert_eq!(
        output.status.code(),
        Some(1),
        "hotpatch fleet {args:?} did not fail: {}",
        String::from_utf8_lossy(&output.stdout)
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn status(etcd: &str) -> Json {
    serde_json::from_str(&fleet_ok(etcd, &["status", FLEET, "--json"])).unwrap()
}

/// A sidecar, SIGKILLed when dropped.
struct Sidecar {
    child: Child,
    port: u16,
    replica: String,
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _already_exited = self.child.kill();
        let _reaped = self.child.wait();
    }
}

impl Sidecar {
    fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
    }

    fn kill(&mut self) {
        let _already_exited = self.child.kill();
        let _reaped = self.child.wait();
    }
}

/// Starts a sidecar for `model` in front of `upstream` (a llama-server's port; with
/// `None`, a dead port and an unverified model), and waits until it is registered.
fn start_sidecar(
    etcd: &str,
    replica: &str,
    model: &Path,
    upstream: Option<u16>,
    ttl_secs: u32,
    env: &[(&str, &str)],
) -> Sidecar {
    start_sidecar_with(etcd, replica, model, upstream, ttl_secs, env, &[])
}

/// [`start_sidecar`] with more `hotpatch serve` arguments.
fn start_sidecar_with(
    etcd: &str,
    replica: &str,
    model: &Path,
    upstream: Option<u16>,
    ttl_secs: u32,
    env: &[(&str, &str)],
    extra: &[&str],
) -> Sidecar {
    let port = tests::free_port();
    let upstream_port = upstream.unwrap_or_else(tests::free_port);
    let mut command = Command::new(HOTPATCH);
    command
        .args([
            "serve",
            "--upstream",
            &format!("http://127.0.0.1:{upstream_port}"),
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--model")
        .arg(model)
        .args(["--fleet", FLEET, "--etcd", etcd, "--replica", replica])
        .args(["--fleet-lease-ttl-secs", &ttl_secs.to_string()])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if upstream.is_none() {
        command.arg("--model-unverified");
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let child = command.spawn().unwrap();
    let mut sidecar = Sidecar {
        child,
        port,
        replica: replica.to_owned(),
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(exit)) = sidecar.child.try_wait() {
            panic!("sidecar {replica} exited with {exit}");
        }
        let members = status(etcd)["members"].clone();
        let registered = members.as_array().is_some_and(|m| {
            m.iter()
                .any(|r| r["replica"] == replica && r["listen"] == format!("127.0.0.1:{port}"))
        });
        if registered {
            return sidecar;
        }
        assert!(
            Instant::now() < deadline,
            "sidecar {replica} did not register"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A deterministic one-token completion through a sidecar: the status and the top
/// probabilities of the token.
fn complete(port: u16) -> (u16, Json) {
    let body = json!({"prompt": "The capital of France is", "n_predict": 1,
        "temperature": 0.0, "seed": 7, "n_probs": 5, "cache_prompt": false})
    .to_string();
    let (status, text) = tests::http_request(port, "POST", "/completion", Some(&body)).unwrap();
    if status != 200 {
        return (status, Json::Null);
    }
    let reply: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    (status, reply["completion_probabilities"][0].clone())
}

fn write_preset(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_owned()
}

fn copies(dir: &Path, count: usize) -> (Vec<PathBuf>, Vec<u8>) {
    let original = std::fs::read(tests::real_model()).unwrap();
    let models = (0..count)
        .map(|i| {
            let path = dir.join(format!("replica{i}.gguf"));
            std::fs::write(&path, &original).unwrap();
            path
        })
        .collect();
    (models, original)
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "waited 60 s for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_fleet_wide_patch_reaches_every_replica_through_a_leader_kill_and_a_restart_and_reverts_exactly()
 {
    let mut etcd = tests::EtcdCluster::start(3);
    let endpoints = etcd.endpoint_list();
    let dir = tempfile::tempdir().unwrap();
    let (models, original) = copies(dir.path(), 3);
    let servers: Vec<tests::LlamaServer> = models
        .iter()
        .map(|m| tests::LlamaServer::start(m, &[]))
        .collect();
    // The third sidecar stops itself (as a SIGKILL would) when it sees a commit and
    // before it applies anything.
    let mut sidecars: Vec<Sidecar> = (0..3)
        .map(|i| {
            let env: &[(&str, &str)] = if i == 2 {
                &[("HOTPATCH_FAILPOINT", "fleet-member-before-apply")]
            } else {
                &[]
            };
            let ttl = if i == 2 { 3 } else { 10 };
            start_sidecar(
                &endpoints,
                &format!("r{i}"),
                &models[i],
                Some(servers[i].port),
                ttl,
                env,
            )
        })
        .collect();
    let before: Vec<Json> = sidecars.iter().map(|s| complete(s.port).1).collect();
    assert!(
        before.iter().all(|b| *b == before[0] && !b.is_null()),
        "{before:?}"
    );
    let preset = write_preset(dir.path(), "halve", HALVE_NORM);

    // The rollout waits for the stopped second sidecar's verdict; the etcd leader is
    // SIGKILLed meanwhile; the sidecar goes on and the rollout completes.
    sidecars[1].signal("-STOP");
    let coordinator = Command::new(HOTPATCH)
        .args([
            "fleet", "apply", FLEET, &preset, "--etcd", &endpoints, "--json",
        ])
        .args(["--apply-timeout-secs", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the rollout to be recorded", || {
        !status(&endpoints)["active"].is_null()
    });
    let leader = etcd.leader().expect("a leader");
    etcd.kill(leader);
    sidecars[1].signal("-CONT");
    let output = coordinator.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let report: Json = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["revision"], 1, "{report}");
    // The third sidecar died after the commit: the commit stands, it is pending.
    assert_eq!(report["pending"], json!(["r2"]), "{report}");

    let after: Vec<Json> = sidecars[..2].iter().map(|s| complete(s.port).1).collect();
    for answer in &after {
        assert_ne!(
            *answer, before[0],
            "a replica still answers as before the patch"
        );
        assert_eq!(*answer, after[0]);
    }
    assert_eq!(
        std::fs::read(&models[2]).unwrap(),
        original,
        "the dead sidecar applied"
    );
    let (_, metrics) = tests::http_request(sidecars[0].port, "GET", "/metrics", None).unwrap();
    for gauge in [
        "hotpatch_fleet_desired_revision{fleet=\"show\"} 1",
        "hotpatch_fleet_applied_revision{fleet=\"show\"} 1",
        "hotpatch_fleet_generation_held{fleet=\"show\"} 0",
    ] {
        assert!(metrics.contains(gauge), "{gauge} missing:\n{metrics}");
    }

    // Restarted while etcd is frozen, the third sidecar cannot converge: it answers
    // generation requests 503. Once etcd answers again it converges, and its first
    // answer is the patched one.
    sidecars[2].kill();
    etcd.freeze(true);
    let port = tests::free_port();
    let restarted = Command::new(HOTPATCH)
        .args([
            "serve",
            "--upstream",
            &format!("http://127.0.0.1:{}", servers[2].port),
        ])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--model")
        .arg(&models[2])
        .args(["--fleet", FLEET, "--etcd", &endpoints, "--replica", "r2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    sidecars[2] = Sidecar {
        child: restarted,
        port,
        replica: "r2".into(),
    };
    wait_until("the restarted sidecar to listen", || {
        tests::http_request(port, "GET", "/metrics", None).is_ok()
    });
    for _ in 0..3 {
        assert_eq!(complete(port).0, 503, "served before converging");
    }
    etcd.freeze(false);
    let answer = loop {
        match complete(port) {
            (503, _) => std::thread::sleep(Duration::from_millis(20)),
            (200, answer) => break answer,
            (other, _) => panic!("the restarted sidecar answered {other}"),
        }
    };
    assert_eq!(
        answer, after[0],
        "the restarted sidecar served before converging"
    );
    assert_eq!(
        std::fs::read(&models[2]).unwrap(),
        std::fs::read(&models[0]).unwrap()
    );

    // The revert restores every replica's answer and every byte of every model.
    let reverted = fleet_ok(&endpoints, &["revert", FLEET, "--json"]);
    let reverted: Json = serde_json::from_str(&reverted).unwrap();
    assert_eq!(reverted["pending"], json!([]), "{reverted}");
    for sidecar in &sidecars {
        assert_eq!(
            complete(sidecar.port).1,
            before[0],
            "replica {}",
            sidecar.replica
        );
    }
    for model in &models {
        assert!(
            std::fs::read(model).unwrap() == original,
            "{} differs",
            model.display()
        );
    }
}

#[test]
fn faults_and_bad_input_abort_rollouts_and_leave_every_model_byte_identical() {
    let etcd = tests::EtcdCluster::start(3);
    let endpoints = etcd.endpoint_list();
    let dir = tempfile::tempdir().unwrap();
    let (models, original) = copies(dir.path(), 3);
    let halve = write_preset(dir.path(), "halve", HALVE_NORM);
    let missing = write_preset(dir.path(), "missing", NO_SUCH_TENSOR);
    let unchanged = |models: &[PathBuf]| {
        for model in models {
            assert!(
                std::fs::read(model).unwrap() == original,
                "{} changed",
                model.display()
            );
        }
    };

    // An unreachable etcd: a clear error, before anything else.
    let dead = format!("http://127.0.0.1:{}", tests::free_port());
    let message = fleet_error(&dead, &["apply", FLEET, &halve]);
    assert!(
        message.contains("etcd at") && message.contains("every endpoint"),
        "{message}"
    );

    // No member yet.
    let message = fleet_error(&endpoints, &["apply", FLEET, &halve]);
    assert!(message.contains("no member is registered"), "{message}");

    let mut sidecars: Vec<Sidecar> = (0..3)
        .map(|i| {
            let ttl = if i == 2 { 10 } else { 3 };
            start_sidecar(&endpoints, &format!("r{i}"), &models[i], None, ttl, &[])
        })
        .collect();

    // A patch set every model refuses: aborted with the member's reason.
    let message = fleet_error(&endpoints, &["apply", FLEET, &missing]);
    assert!(
        message.contains("aborted") && message.contains("no.such.tensor"),
        "{message}"
    );
    unchanged(&models);

    // A member with a different model header.
    let other = dir.path().join("other.gguf");
    std::fs::write(&other, &original).unwrap();
    let set = Command::new(HOTPATCH)
        .args(["meta", "set"])
        .arg(&other)
        .args(["general.name", "another-model"])
        .output()
        .unwrap();
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    let mut stranger = start_sidecar(&endpoints, "stranger", &other, None, 3, &[]);
    let message = fleet_error(&endpoints, &["apply", FLEET, &halve]);
    assert!(message.contains("different headers"), "{message}");
    unchanged(&models);
    stranger.kill();
    wait_until("the stranger's lease to expire", || {
        status(&endpoints)["members"]
            .as_array()
            .is_some_and(|m| m.len() == 3)
    });

    // A sidecar SIGKILLed during prepare: it is stopped before it can prepare, a second
    // rollout started meanwhile is refused, then it is killed and its lease expires.
    sidecars[2].signal("-STOP");
    let coordinator = Command::new(HOTPATCH)
        .args(["fleet", "apply", FLEET, &halve, "--etcd", &endpoints])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("two verdicts", || {
        status(&endpoints)["active"]["prepared"]
            .as_object()
            .is_some_and(|p| p.len() == 2)
    });
    let message = fleet_error(&endpoints, &["apply", FLEET, &halve]);
    assert!(message.contains("is in flight"), "{message}");
    sidecars[2].kill();
    let output = coordinator.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("aborted") && message.contains("r2"),
        "{message}"
    );
    unchanged(&models);
    sidecars.pop();

    // The coordinator dies between prepare and commit; the next call commits the
    // rollout (every member was ready), then does its own work (here, reverting it).
    let crashed = Command::new(HOTPATCH)
        .args(["fleet", "apply", FLEET, &halve, "--etcd", &endpoints])
        .env("HOTPATCH_FAILPOINT", "fleet-coordinator-before-commit")
        .output()
        .unwrap();
    assert!(!crashed.status.success());
    let left = status(&endpoints);
    assert_eq!(left["active"]["phase"], "prepare", "{left}");
    unchanged(&models[..2]);
    let second = fleet_ok(&endpoints, &["revert", FLEET]);
    assert!(
        second.contains("first settled") && second.contains("committed"),
        "{second}"
    );
    let history: Json =
        serde_json::from_str(&fleet_ok(&endpoints, &["history", FLEET, "--json"])).unwrap();
    let decisions: Vec<&str> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["decision"]["decision"].as_str().unwrap_or("none"))
        .collect();
    assert_eq!(
        decisions,
        ["abort", "abort", "commit", "commit"],
        "{history}"
    );
    unchanged(&models[..2]);

    // A desired state written by hand that this version cannot read: refused, nothing
    // changes.
    let etcdctl = tests::etcd_binary().with_file_name("etcdctl");
    let put = Command::new(etcdctl)
        .args([
            "--endpoints",
            &endpoints,
            "put",
            &format!("/hotpatch/fleet/{FLEET}/desired"),
            "{\"revision\": \"three\"}",
        ])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(
        put.status.success(),
        "{}",
        String::from_utf8_lossy(&put.stderr)
    );
    let message = fleet_error(&endpoints, &["apply", FLEET, &halve]);
    assert!(message.contains("malformed desired"), "{message}");
    std::thread::sleep(Duration::from_millis(300));
    unchanged(&models[..2]);
}

/// The health check of the rolling tests: four greedy tokens of a fixed prompt.
const HEALTH_REQUEST: &str =
    r#"{"path": "/completion", "body": {"prompt": "The capital of France is", "n_predict": 4}}"#;

/// The text a sidecar generates for [`HEALTH_REQUEST`].
fn generated(port: u16) -> String {
    let body = json!({"prompt": "The capital of France is", "n_predict": 4,
        "temperature": 0.0, "cache_prompt": false})
    .to_string();
    let (status, text) = tests::http_request(port, "POST", "/completion", Some(&body)).unwrap();
    assert_eq!(status, 200, "{text}");
    let reply: Json = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    reply["content"].as_str().unwrap().to_owned()
}

/// Three replicas on copies of the real model; `rules[i]`, when given, is a rules file
/// of replica `i`'s own (not the fleet's).
fn rolling_fleet(
    dir: &Path,
    endpoints: &str,
    rules: &[Option<&str>],
) -> (Vec<PathBuf>, Vec<u8>, Vec<tests::LlamaServer>, Vec<Sidecar>) {
    let (models, original) = copies(dir, 3);
    let servers: Vec<tests::LlamaServer> = models
        .iter()
        .map(|m| tests::LlamaServer::start(m, &[]))
        .collect();
    let sidecars = (0..3)
        .map(|i| {
            let mut extra = Vec::new();
            let rules_path = dir.join(format!("rules{i}.toml"));
            if let Some(Some(text)) = rules.get(i) {
                std::fs::write(&rules_path, text).unwrap();
                extra = vec!["--rules", rules_path.to_str().unwrap()];
            }
            start_sidecar_with(
                endpoints,
                &format!("r{i}"),
                &models[i],
                Some(servers[i].port),
                10,
                &[],
                &extra,
            )
        })
        .collect();
    (models, original, servers, sidecars)
}

#[test]
fn rolling_mode_with_a_health_check_that_fails_on_the_second_replica_leaves_the_fleet_as_it_was() {
    let etcd = tests::EtcdCluster::start(3);
    let endpoints = etcd.endpoint_list();
    let dir = tempfile::tempdir().unwrap();
    // The second replica masks every letter it generates (a rule of its own), so its
    // answers fail a check that wants letters, with or without the patch; the first
    // passes it (halving the final norm halves every logit and keeps the greedy tokens).
    let masked = "[[rule]]\nname = \"mask-letters\"\naction = { type = \"redact\", pattern = \"[A-Za-z]\", regex = true, mask = \"#\" }\n";
    let (models, original, _servers, sidecars) =
        rolling_fleet(dir.path(), &endpoints, &[None, Some(masked), None]);
    let letters = regex::Regex::new("[A-Za-z]").unwrap();
    assert!(letters.is_match(&generated(sidecars[0].port)));
    assert!(!letters.is_match(&generated(sidecars[1].port)));
    let before: Vec<Json> = sidecars.iter().map(|s| complete(s.port).1).collect();
    assert!(before.iter().all(|b| !b.is_null()), "{before:?}");
    let preset = write_preset(dir.path(), "halve", HALVE_NORM);

    let message = fleet_error(
        &endpoints,
        &[
            "apply",
            FLEET,
            &preset,
            "--rolling",
            "--health-request",
            HEALTH_REQUEST,
            "--health-expect-regex",
            "[A-Za-z]",
            "--apply-timeout-secs",
            "30",
        ],
    );
    assert!(
        message.contains("rolled back")
            && message.contains("health check failed on r1")
            && message.contains("reverted on r0, r1"),
        "{message}"
    );

    // Every model file is byte-identical to before and every replica answers as
    // before (the patch changes every token's probabilities, so a replica that kept
    // it would answer otherwise).
    for model in &models {
        assert!(
            std::fs::read(model).unwrap() == original,
            "{} differs",
            model.display()
        );
    }
    for (sidecar, before) in sidecars.iter().zip(&before) {
        assert_eq!(
            complete(sidecar.port).1,
            *before,
            "replica {}",
            sidecar.replica
        );
    }
    let now = status(&endpoints);
    assert!(now["active"].is_null(), "{now}");
    assert_eq!(now["desired"]["revision"], 0, "{now}");
    assert!(
        now["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["applied_rollouts"] == json!([])),
        "{now}"
    );

    // The history says how far it went: r0 applied and passed, r1 applied and failed,
    // r2 never started; both took it back out.
    let history: Json =
        serde_json::from_str(&fleet_ok(&endpoints, &["history", FLEET, "--json"])).unwrap();
    let entry = &history[0];
    assert_eq!(entry["decision"]["decision"], "abort", "{history}");
    let rolling = &entry["rolling"];
    assert_eq!(rolling["admitted"], json!(["r0", "r1"]), "{history}");
    assert_eq!(rolling["applied"], json!(["r0", "r1"]), "{history}");
    assert_eq!(rolling["health"]["r0"]["passed"], true, "{history}");
    assert_eq!(rolling["health"]["r1"]["passed"], false, "{history}");
    assert_eq!(rolling["reverted"], json!(["r0", "r1"]), "{history}");
    assert_eq!(rolling["rollback"]["pending"], json!([]), "{history}");
    let text = fleet_ok(&endpoints, &["history", FLEET]);
    assert!(
        text.contains("(rolling)") && text.contains("r1: health failed"),
        "{text}"
    );
}

#[test]
fn a_passing_rolling_rollout_reaches_every_replica_one_at_a_time() {
    let etcd = tests::EtcdCluster::start(3);
    let endpoints = etcd.endpoint_list();
    let dir = tempfile::tempdir().unwrap();
    let (models, original, _servers, sidecars) = rolling_fleet(dir.path(), &endpoints, &[]);
    let before: Vec<Json> = sidecars.iter().map(|s| complete(s.port).1).collect();
    assert!(
        before.iter().all(|b| *b == before[0] && !b.is_null()),
        "{before:?}"
    );
    let preset = write_preset(dir.path(), "halve", HALVE_NORM);
    let report = fleet_ok(
        &endpoints,
        &[
            "apply",
            FLEET,
            &preset,
            "--json",
            "--rolling",
            "--health-request",
            HEALTH_REQUEST,
            "--health-expect-pointer",
            "/stop=true",
        ],
    );
    let report: Json = serde_json::from_str(&report).unwrap();
    assert_eq!(report["rolling"], true, "{report}");
    assert_eq!(report["revision"], 1, "{report}");
    assert_eq!(report["pending"], json!([]), "{report}");
    // One at a time: each replica applied after the previous one passed its check.
    let members = report["members"].as_array().unwrap();
    let mut last_check = 0;
    for member in members {
        assert_eq!(member["health"]["passed"], true, "{report}");
        let applied = member["done"]["at_ms"].as_u64().unwrap();
        let checked = member["health"]["at_ms"].as_u64().unwrap();
        assert!(
            last_check <= applied && applied <= checked,
            "{} applied before its turn: {report}",
            member["replica"]
        );
        last_check = checked;
    }
    for sidecar in &sidecars {
        let answer = complete(sidecar.port).1;
        assert_ne!(
            answer, before[0],
            "replica {} is unpatched",
            sidecar.replica
        );
        assert_eq!(answer, complete(sidecars[0].port).1);
    }
    let patched = std::fs::read(&models[0]).unwrap();
    assert!(patched != original, "the model file did not change");
    for model in &models[1..] {
        assert!(std::fs::read(model).unwrap() == patched);
    }
    let history = fleet_ok(&endpoints, &["history", FLEET]);
    assert!(
        history.contains("(rolling)") && history.contains("committed (revision 1)"),
        "{history}"
    );
    // Every rollout record was written once: a member that wrote its verdict or its
    // `done` does not write it again on the events that follow (each write wakes every
    // member, so repeats would grow with the square of the fleet).
    let etcdctl = tests::etcd_binary().with_file_name("etcdctl");
    let listed = Command::new(etcdctl)
        .args(["--endpoints", &endpoints, "get", "--prefix", "-w", "json"])
        .arg(format!("/hotpatch/fleet/{FLEET}/rollouts/"))
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(listed.status.success());
    let listed: Json = serde_json::from_slice(&listed.stdout).unwrap();
    let kvs = listed["kvs"].as_array().unwrap();
    // spec, decision, coordinator gone with its lease; per member: prepare, wave,
    // done, health.
    assert_eq!(kvs.len(), 2 + 3 * 4, "{listed}");
    assert!(kvs.iter().all(|kv| kv["version"] == 1), "{listed}");
}

#[test]
fn a_rolling_rollout_whose_coordinator_dies_is_resumed_by_the_next_call() {
    let etcd = tests::EtcdCluster::start(3);
    let endpoints = etcd.endpoint_list();
    let dir = tempfile::tempdir().unwrap();
    let (models, original, _servers, sidecars) = rolling_fleet(dir.path(), &endpoints, &[]);
    let before = complete(sidecars[0].port).1;
    assert!(!before.is_null());
    let preset = write_preset(dir.path(), "halve", HALVE_NORM);

    // The coordinator dies (as a SIGKILL would) once the first replica has passed.
    let crashed = Command::new(HOTPATCH)
        .args([
            "fleet",
            "apply",
            FLEET,
            &preset,
            "--etcd",
            &endpoints,
            "--rolling",
        ])
        .args(["--health-request", HEALTH_REQUEST])
        .args(["--health-expect-pointer", "/stop=true"])
        .env("HOTPATCH_FAILPOINT", "fleet-coordinator-after-health")
        .output()
        .unwrap();
    assert!(!crashed.status.success());
    let left = status(&endpoints);
    assert_eq!(left["active"]["phase"], "rolling", "{left}");
    assert_eq!(
        left["active"]["rolling"]["admitted"],
        json!(["r0"]),
        "{left}"
    );
    assert_ne!(complete(sidecars[0].port).1, before, "r0 did not apply");
    assert_eq!(
        complete(sidecars[1].port).1,
        before,
        "r1 applied out of turn"
    );
    assert_eq!(std::fs::read(&models[2]).unwrap(), original);

    // Its lease expires; the next call takes the rollout over, checks the other two
    // replicas and commits it, then does its own work: here, reverting it.
    wait_until("the dead coordinator's lease to expire", || {
        status(&endpoints)["active"]["rolling"]["driven"] == false
    });
    let text = fleet_ok(&endpoints, &["status", FLEET]);
    assert!(text.contains("resumes it"), "{text}");
    let reverted = fleet_ok(&endpoints, &["revert", FLEET]);
    assert!(
        reverted.contains("first settled") && reverted.contains("committed at revision 1"),
        "{reverted}"
    );
    let history: Json =
        serde_json::from_str(&fleet_ok(&endpoints, &["history", FLEET, "--json"])).unwrap();
    let rolling = &history[0]["rolling"];
    assert_eq!(history[0]["decision"]["decision"], "commit", "{history}");
    assert_eq!(rolling["admitted"], json!(["r0", "r1", "r2"]), "{history}");
    for replica in ["r0", "r1", "r2"] {
        assert_eq!(rolling["health"][replica]["passed"], true, "{history}");
    }
    for sidecar in &sidecars {
        assert_eq!(
            complete(sidecar.port).1,
            before,
            "replica {}",
            sidecar.replica
        );
    }
    for model in &models {
        assert!(
            std::fs::read(model).unwrap() == original,
            "{}",
            model.display()
        );
    }
}
