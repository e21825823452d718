//! The manager's commands run as a user runs them: presets, configuration, pipelines and
//! the per-layer diff plot.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value as Json;

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");

fn run(args: &[&str], config: &Path) -> Output {
    Command::new(HOTPATCH)
        .args(args)
        .env("HOTPATCH_CONFIG_DIR", config)
        .output()
        .unwrap()
}

fn ok(args: &[&str], config: &Path) -> String {
    let output = run(args, config);
    assert!(
        output.status.success(),
        "hotpatch {args:?} failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

fn demo(dir: &Path) -> std::path::PathBuf {
    unified_manager::demo::write_demo_model(dir, unified_manager::demo::DemoShape::default())
        .unwrap()
}

const PRESET: &str = r#"
name = "quiet"
version = 2
description = "halve two norms"

[[memory_patch]]
name = "halve-output-norm"
tensor = "output_norm.weight"
transform = { scale = 0.5 }

[[memory_patch]]
name = "halve-first-norm"
tensor = "blk.0.attn_norm.weight"
transform = { scale = 0.5 }
"#;

#[test]
fn presets_from_save_to_apply_revert_export_and_import() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let model = demo(dir.path());
    let model = model.to_str().unwrap();
    let original = std::fs::read(model).unwrap();
    let file = dir.path().join("quiet.toml");
    std::fs::write(&file, PRESET).unwrap();
    let file = file.to_str().unwrap();

    ok(&["preset", "save", file, "--dry-run"], &config);
    assert!(!config.exists(), "a dry run stored the preset");
    ok(&["preset", "save", file], &config);
    let with_rule = format!(
        "{PRESET}\n[[server_rule]]\nname = \"cap\"\naction = {{ type = \"clamp\", key = \"max_tokens\", max = 64.0 }}\n"
    );
    std::fs::write(dir.path().join("ruled.toml"), with_rule).unwrap();
    ok(
        &[
            "preset",
            "save",
            dir.path().join("ruled.toml").to_str().unwrap(),
            "--name",
            "ruled",
        ],
        &config,
    );
    let list: Json = serde_json::from_str(&ok(&["preset", "list", "--json"], &config)).unwrap();
    assert_eq!(list[0]["name"], "quiet");
    assert_eq!(list[0]["version"], 2);
    assert_eq!(list[1]["name"], "ruled");
    assert_eq!(list[1]["server_rules"], 1);
    let shown = ok(&["preset", "show", "quiet"], &config);
    assert_eq!(
        unified_manager::Preset::from_toml("shown", &shown).unwrap(),
        unified_manager::Preset::from_toml("original", PRESET).unwrap()
    );

    // A dry run applies to a private view; a preset with rules needs a server.
    ok(&["preset", "apply", "quiet", model, "--dry-run"], &config);
    assert!(std::fs::read(model).unwrap() == original);
    let refused = run(&["preset", "apply", "ruled", model], &config);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("server"));
    assert!(std::fs::read(model).unwrap() == original);

    // Applied in place as one journal transaction, reverted by it.
    let applied: Json =
        serde_json::from_str(&ok(&["preset", "apply", "quiet", model, "--json"], &config)).unwrap();
    let transaction = applied["applied"][0]["journal_transaction"]
        .as_u64()
        .unwrap();
    assert_eq!(applied["applied"][1]["journal_transaction"], transaction);
    assert!(std::fs::read(model).unwrap() != original);
    ok(&["revert", model, &transaction.to_string()], &config);
    assert!(std::fs::read(model).unwrap() == original);

    // Export, then import into an empty directory: the same presets, byte for byte.
    let export = dir.path().join("export.json");
    ok(&["config", "export", export.to_str().unwrap()], &config);
    let exported: Json = serde_json::from_str(&std::fs::read_to_string(&export).unwrap()).unwrap();
    assert_eq!(exported["schema_version"], 1);
    let other = dir.path().join("other");
    ok(
        &["config", "import", export.to_str().unwrap(), "--dry-run"],
        &other,
    );
    assert!(!other.exists(), "a dry run imported");
    ok(&["config", "import", export.to_str().unwrap()], &other);
    for name in ["quiet", "ruled"] {
        let path = |base: &Path| base.join("presets").join(format!("{name}.toml"));
        assert_eq!(
            std::fs::read(path(&other)).unwrap(),
            std::fs::read(path(&config)).unwrap()
        );
    }
    ok(&["preset", "delete", "quiet", "--dry-run"], &other);
    ok(&["preset", "delete", "quiet"], &other);
    let missing = run(&["preset", "show", "quiet"], &other);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("no preset named \"quiet\""));
}

#[test]
fn the_safety_command_repairs_in_place_and_the_journal_reverts_it() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let model = demo(dir.path());
    let offset = {
        let map = byte_tier::MappedFile::open(&model).unwrap();
        map.parse()
            .unwrap()
            .tensor("blk.3.ffn_down.weight")
            .unwrap()
            .data_offset
    };
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&model)
        .unwrap();
    file.write_all_at(&f32::NAN.to_le_bytes(), offset).unwrap();
    drop(file);
    let planted = std::fs::read(&model).unwrap();
    let model = model.to_str().unwrap();

    let dry: Json = serde_json::from_str(&ok(
        &["safety", model, "--repair", "zero", "--dry-run", "--json"],
        &config,
    ))
    .unwrap();
    assert_eq!(dry["dry_run"], true);
    assert!(std::fs::read(model).unwrap() == planted);

    let report: Json = serde_json::from_str(&ok(
        &["safety", model, "--repair", "zero", "--json"],
        &config,
    ))
    .unwrap();
    let steps = report["steps"].as_array().unwrap();
    let write = steps.iter().find(|s| s["step"] == "write").unwrap();
    assert_eq!(write["result"]["status"], "ok");
    let repaired = std::fs::read(model).unwrap();
    let changed = planted
        .iter()
        .zip(&repaired)
        .filter(|(a, b)| a != b)
        .count() as u64;
    assert_eq!(write["bytes"].as_u64().unwrap(), changed);
    assert_eq!(
        &repaired[offset as usize..offset as usize + 4],
        &[0, 0, 0, 0]
    );
    let transaction = report["undo"]["journal_transaction"].as_u64().unwrap();
    ok(&["revert", model, &transaction.to_string()], &config);
    assert!(std::fs::read(model).unwrap() == planted);

    // A second scan without repair finds the NaN, says so, and exits 1.
    let output = run(&["safety", model], &config);
    assert_eq!(output.status.code(), Some(1));
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("1 NaN"), "{text}");
    assert!(text.contains("repair not asked for"), "{text}");
    let error = String::from_utf8_lossy(&output.stderr);
    assert!(
        error.contains("left unresolved: 1 NaN and 0 infinite values in 1 tensors"),
        "{error}"
    );
    assert!(std::fs::read(model).unwrap() == planted);
}

#[test]
fn optimize_and_a_per_layer_diff_plot() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let model = demo(dir.path());
    let out = dir.path().join("small.gguf");
    let (model, out) = (model.to_str().unwrap(), out.to_str().unwrap());
    let dry = ok(
        &["optimize", model, "--prune", "3", "-o", out, "--dry-run"],
        &config,
    );
    assert!(dry.contains("dry run"), "{dry}");
    assert!(!Path::new(out).exists());
    let report: Json = serde_json::from_str(&ok(
        &[
            "optimize",
            model,
            "--tensors",
            "ffn_down",
            "--to",
            "Q8_0",
            "-o",
            out,
            "--json",
        ],
        &config,
    ))
    .unwrap();
    let write = &report["steps"][2];
    assert_eq!(
        write["bytes"].as_u64().unwrap(),
        std::fs::metadata(out).unwrap().len()
    );

    // A scale of one block's down projection shows in that block's bar alone.
    let scaled = dir.path().join("scaled.gguf");
    std::fs::copy(model, &scaled).unwrap();
    let scaled = scaled.to_str().unwrap();
    ok(
        &[
            "patch",
            scaled,
            "--tensor",
            "blk.1.ffn_down.weight",
            "--scale",
            "0.5",
        ],
        &config,
    );
    let svg = dir.path().join("change.svg");
    let text = ok(
        &["diff", model, scaled, "--plot", svg.to_str().unwrap()],
        &config,
    );
    assert!(text.contains("per-layer change plotted"), "{text}");
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg"), "{svg}");
    assert!(svg.contains(unified_manager::plot::Y_AXIS), "{svg}");
    // The axis is in percent: its highest tick is at or above the bar's 50 (%), not 0.5.
    let ticks: Vec<f64> = svg
        .split("</text>")
        .filter_map(|piece| piece.rsplit('>').next()?.trim().parse().ok())
        .collect();
    let highest = ticks.iter().copied().fold(0.0f64, f64::max);
    assert!((50.0..=57.5).contains(&highest), "{ticks:?}");
    // The bar's tooltip holds the text report's line for the tensor, and says 50%.
    let line = text
        .lines()
        .find(|l| l.starts_with("~ tensor blk.1.ffn_down.weight"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(line.ends_with("(50.00% of rms)"), "{line}");
    let tooltip = svg
        .split("<title>")
        .skip(1)
        .map(|piece| piece.split("</title>").next().unwrap())
        .find(|t| t.starts_with("block 1:"))
        .unwrap_or_else(|| panic!("{svg}"));
    assert!(
        tooltip.starts_with("block 1: largest tensor change 50.00% of rms"),
        "{tooltip}"
    );
    assert!(
        tooltip.contains(line.strip_prefix("~ tensor ").unwrap()),
        "{tooltip}"
    );
    assert_eq!(svg.matches("<title>").count(), 5, "one tooltip per bar");

    let layers = {
        let a = byte_tier::MappedFile::open(model).unwrap();
        let b = byte_tier::MappedFile::open(scaled).unwrap();
        unified_manager::plot::layer_changes(&a.parse().unwrap(), &b.parse().unwrap()).unwrap()
    };
    assert_eq!(layers.len(), 5, "{layers:?}");
    for layer in &layers {
        if layer.layer == Some(1) {
            assert_eq!(layer.tensors_changed, 1);
            // ||0.5 W - W|| over the block's weights: half the down projection's norm
            // against the whole block's.
            assert!(
                layer.relative_change > 0.1 && layer.relative_change < 0.5,
                "{layer:?}"
            );
        } else {
            assert_eq!(layer.relative_change, 0.0, "{layer:?}");
        }
    }
}

#[test]
fn a_refused_page_lock_fails_the_boost_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo(dir.path());
    // Without CAP_IPC_LOCK and with a 64 KiB RLIMIT_MEMLOCK, the kernel refuses mlock.
    let output = std::process::Command::new("bash")
        .arg("-c")
        .arg(format!(
            "ulimit -l 64 && exec setpriv --bounding-set=-ipc_lock --inh-caps=-ipc_lock {} boost {} --mlock --no-cold-read",
            env!("CARGO_BIN_EXE_hotpatch"),
            model.display()
        ))
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("RLIMIT_MEMLOCK is 65536 bytes"), "{stdout}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("stopped at a failed step"), "{stderr}");
}

#[test]
fn help_documents_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let help = ok(&["--help"], dir.path());
    assert!(help.contains("Exit codes:"), "{help}");
    for command in [
        "safety", "optimize", "boost", "preset", "config", "serve", "demo",
    ] {
        assert!(help.contains(command), "{command} missing from:\n{help}");
    }
}

#[test]
fn queries_answer_json_and_writers_take_a_dry_run() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let model = demo(dir.path());
    let original = std::fs::read(&model).unwrap();
    let m = model.to_str().unwrap();
    let json = |args: &[&str]| -> Json {
        let text = ok(args, &config);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"))
    };
    assert_eq!(
        json(&["hexdump", m, "--len", "4", "--json"])["hex"],
        "47475546"
    );
    assert_eq!(
        json(&["meta", "get", m, "llama.block_count", "--json"])["value"],
        4
    );
    assert!(
        json(&["history", m, "--json"]).is_array() || json(&["history", m, "--json"]).is_object()
    );
    let npy = dir.path().join("t.npy");
    let manifest = dir.path().join("m.txt");
    for args in [
        vec![
            "tensor",
            "export",
            m,
            "output_norm.weight",
            "-o",
            npy.to_str().unwrap(),
            "--dry-run",
        ],
        vec![
            "verify",
            m,
            "--write-manifest",
            manifest.to_str().unwrap(),
            "--dry-run",
        ],
        vec!["recover", m, "--dry-run"],
        vec!["meta", "set", m, "general.name", "renamed", "--dry-run"],
        vec![
            "patch",
            m,
            "--tensor",
            "output_norm.weight",
            "--scale",
            "2",
            "--dry-run",
        ],
        vec![
            "bytes",
            m,
            "--dry-run",
            "fill",
            "--offset",
            "8",
            "--len",
            "4",
            "--byte",
            "0",
        ],
        vec!["boost", m, "--dry-run"],
    ] {
        ok(&args, &config);
    }
    assert!(
        !npy.exists() && !manifest.exists(),
        "a dry run wrote a file"
    );
    assert!(
        std::fs::read(&model).unwrap() == original,
        "a dry run changed the model"
    );
}

/// `hotpatch serve` in front of an upstream that is not there: its admin API still
/// edits rules.
struct Serve(std::process::Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_preset_and_the_safety_pipeline_reach_a_running_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config");
    let model = demo(dir.path());
    let model = model.to_str().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let port = tests::free_port();
    let _serve = Serve(
        Command::new(HOTPATCH)
            .args(["serve", "--upstream", "http://127.0.0.1:9", "--listen"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("--admin-token-file")
            .arg(&token)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let rules = || -> Vec<String> {
        let mut response = agent
            .get(&format!("{base}/admin/rules"))
            .header("Authorization", "Bearer t0ken")
            .call()
            .unwrap();
        let value: Json = response.body_mut().read_json().unwrap();
        let list = value.get("rules").cloned().unwrap_or(value);
        list.as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while tests::http_request(port, "GET", "/metrics", None).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "hotpatch serve did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }

    let file = dir.path().join("ruled.toml");
    std::fs::write(
        &file,
        "name = \"ruled\"\nversion = 1\n[[server_rule]]\nname = \"cap\"\naction = { type = \"clamp\", key = \"max_tokens\", max = 64.0 }\n",
    )
    .unwrap();
    ok(&["preset", "save", file.to_str().unwrap()], &config);
    let server = [
        "--server",
        base.as_str(),
        "--admin-token-file",
        token.to_str().unwrap(),
    ];
    let mut args = vec!["preset", "apply", "ruled", model];
    args.extend(server);
    ok(&args, &config);
    assert_eq!(rules(), ["cap"]);

    let mut args = vec![
        "safety",
        model,
        "--max-tokens",
        "128",
        "--redact",
        "hunter2",
    ];
    args.extend(server);
    let text = ok(&args, &config);
    assert!(text.contains("safety-max-tokens"), "{text}");
    assert_eq!(
        rules(),
        [
            "cap",
            "safety-max-tokens",
            "safety-n-predict",
            "safety-redact-1"
        ]
    );
    // A wrong token: the step fails, the command exits 1, nothing is added.
    let wrong = dir.path().join("wrong");
    std::fs::write(&wrong, "nope").unwrap();
    let output = run(
        &[
            "preset",
            "apply",
            "ruled",
            model,
            "--server",
            &base,
            "--admin-token-file",
            wrong.to_str().unwrap(),
        ],
        &config,
    );
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("401"),
        "{output:?}"
    );
}
