//! One dry-run mechanism: every converted writing command, run with `--dry-run --json`
//! on a copy of the real model, prints a plan that parses and names what would change,
//! and leaves every file (and the absence of a journal) as it was; run for real, it
//! makes exactly the change the plan named.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

use byte_tier::{Gguf, MappedFile, codec};
use serde_json::Value as Json;

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");

fn ok(dir: &Path, args: &[&str]) -> String {
    let output = Command::new(HOTPATCH)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "hotpatch {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Every file of `dir` (recursively): its bytes' SHA-256 and its modification time.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (String, SystemTime)> {
    let mut files = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(snapshot(&path));
            continue;
        }
        let bytes = std::fs::read(&path).unwrap();
        let modified = std::fs::metadata(&path).unwrap().modified().unwrap();
        files.insert(
            path,
            (
                byte_tier::ops::to_hex(&byte_tier::ops::sha256(&bytes)),
                modified,
            ),
        );
    }
    files
}

/// Runs `args` with `--dry-run --json`: the plan, after checking that nothing in `dir`
/// changed (no byte, no modification time, no new file such as a journal).
fn dry(dir: &Path, args: &[&str]) -> Json {
    let before = snapshot(dir);
    let mut all = args.to_vec();
    all.extend(["--dry-run", "--json"]);
    let text = ok(dir, &all);
    let plan: Json =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{args:?}: {e}: {text}"));
    assert_eq!(plan["dry_run"], true, "{args:?}: {plan}");
    assert_eq!(plan["changes_nothing"], false, "{args:?}: {plan}");
    assert_eq!(snapshot(dir), before, "{args:?}: the dry run wrote");
    plan
}

fn strings(value: &Json) -> Vec<String> {
    value
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// Plans `args`, runs them for real and checks that the change is the plan's.
fn plan_then_apply(dir: &Path, args: &[&str]) -> Json {
    let plan = dry(dir, args);
    match plan["kind"].as_str().unwrap() {
        "in_place" => {
            let file = dir.join(plan["file"].as_str().unwrap());
            let before = std::fs::read(&file).unwrap();
            ok(dir, args);
            let after = std::fs::read(&file).unwrap();
            assert_eq!(after.len() as u64, plan["size_after"].as_u64().unwrap());
            // Outside the planned ranges nothing changed; inside, something did.
            let mut ranges: Vec<(usize, usize)> = match plan["writes"].as_array() {
                Some(writes) => writes
                    .iter()
                    .map(|w| {
                        let offset = w["offset"].as_u64().unwrap() as usize;
                        (offset, offset + w["len"].as_u64().unwrap() as usize)
                    })
                    .collect(),
                // Whole tensors (ablation): the tensors the plan names.
                None => {
                    let map = MappedFile::open(&file).unwrap();
                    let gguf = map.parse().unwrap();
                    plan["tensors"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|t| {
                            let r = gguf
                                .require_tensor(t["name"].as_str().unwrap())
                                .unwrap()
                                .data_range();
                            (r.start as usize, r.end as usize)
                        })
                        .collect()
                }
            };
            ranges.sort_unstable();
            let mut at = 0;
            for (start, end) in &ranges {
                assert_eq!(before[at..*start], after[at..*start], "{args:?}");
                assert_ne!(before[*start..*end], after[*start..*end], "{args:?}");
                at = *end;
            }
            assert_eq!(before[at..], after[at..], "{args:?}");
        }
        "rewrite" => {
            ok(dir, args);
            let output = dir.join(plan["output"].as_str().unwrap());
            let map = MappedFile::open(&output).unwrap();
            let gguf = map.parse().unwrap();
            assert_eq!(gguf.file_len(), plan["size_after"].as_u64().unwrap());
            check_rewrite(&plan, &gguf);
        }
        "new_files" => {
            ok(dir, args);
            for file in plan["files"].as_array().unwrap() {
                let path = dir.join(file["path"].as_str().unwrap());
                let bytes = std::fs::read(&path).unwrap();
                assert_eq!(bytes.len() as u64, file["n_bytes"].as_u64().unwrap());
                if let Some(sha) = file["sha256"].as_str() {
                    assert_eq!(byte_tier::ops::to_hex(&byte_tier::ops::sha256(&bytes)), sha);
                }
            }
        }
        "config" => {
            ok(dir, args);
            for file in plan["files"].as_array().unwrap() {
                let path = dir.join(file["path"].as_str().unwrap());
                let bytes = std::fs::read(&path).unwrap();
                assert_eq!(bytes.len() as u64, file["n_bytes"].as_u64().unwrap());
            }
            for path in plan["removes"].as_array().unwrap() {
                assert!(!dir.join(path.as_str().unwrap()).exists(), "{path} is left");
            }
        }
        other => panic!("unknown plan kind {other}"),
    }
    plan
}

/// The rewritten file has the keys and tensors the plan said it would add and lose.
fn check_rewrite(plan: &Json, gguf: &Gguf<'_>) {
    for key in strings(&plan["keys_added"])
        .iter()
        .chain(&strings(&plan["keys_changed"]))
    {
        assert!(gguf.get(key.as_str()).is_some(), "{key} missing");
    }
    for key in strings(&plan["keys_removed"]) {
        assert!(gguf.get(key.as_str()).is_none(), "{key} still there");
    }
    for name in strings(&plan["tensors_added"]) {
        assert!(gguf.tensor(&name).is_some(), "{name} missing");
    }
    for name in strings(&plan["tensors_removed"]) {
        assert!(gguf.tensor(&name).is_none(), "{name} still there");
    }
}

fn copy_model(dir: &Path) -> PathBuf {
    let path = dir.join("m.gguf");
    std::fs::copy(tests::real_model(), &path).unwrap();
    path
}

#[test]
fn in_place_commands_plan_then_apply_the_same_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let model = copy_model(d);

    let plan = plan_then_apply(
        d,
        &[
            "bytes",
            "m.gguf",
            "fill",
            "--tensor",
            "output_norm.weight",
            "--len",
            "8",
            "--byte",
            "0",
        ],
    );
    assert_eq!(plan["writes"][0]["tensor"], "output_norm.weight");
    assert_eq!(plan["bytes"], 8);

    let plan = plan_then_apply(d, &["revert", "m.gguf", "--last"]);
    assert_eq!(plan["reverts"], 1);
    assert_eq!(plan["writes"][0]["tensor"], "output_norm.weight");

    // A same-length value is set in place.
    let name = {
        let map = MappedFile::open(&model).unwrap();
        let gguf = map.parse().unwrap();
        gguf.get_str("general.name").unwrap().to_owned()
    };
    let same_length = "x".repeat(name.len());
    let plan = plan_then_apply(d, &["meta", "set", "m.gguf", "general.name", &same_length]);
    assert_eq!(plan["kind"], "in_place");
    assert_eq!(plan["key"], "general.name");
    assert_eq!(plan["writes"][0]["key"], "general.name");

    // Values from a .npy: the plan carries the codec's cost.
    let npy = d.join("norm.npy");
    let (dims, values) = {
        let map = MappedFile::open(&model).unwrap();
        let gguf = map.parse().unwrap();
        let t = gguf.require_tensor("output_norm.weight").unwrap();
        let values = codec::dequantize_tensor(&gguf, t, 0..t.n_elements).unwrap();
        (t.dims.clone(), values)
    };
    let doubled: Vec<f32> = values.iter().map(|v| v * 2.0 + 0.5).collect();
    codec::write_tensor_npy(&npy, &dims, &doubled).unwrap();
    let plan = plan_then_apply(
        d,
        &[
            "tensor",
            "import",
            "m.gguf",
            "output_norm.weight",
            "norm.npy",
        ],
    );
    assert_eq!(plan["tensor"], "output_norm.weight");
    assert!(plan["rms_error"].is_number(), "{plan}");

    // A write stopped halfway (the process aborts between its two halves): recovery
    // is planned from the journal and rolls back exactly what the plan says.
    let status = Command::new(HOTPATCH)
        .current_dir(d)
        .args([
            "bytes",
            "m.gguf",
            "fill",
            "--tensor",
            "output_norm.weight",
            "--len",
            "16",
            "--byte",
            "7",
        ])
        .env("HOTPATCH_FAILPOINT", "mid-write")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(!status.success(), "the failpoint did not stop the write");
    let plan = plan_then_apply(d, &["recover", "m.gguf"]);
    assert!(plan["rolls_back"].is_u64(), "{plan}");
    assert_eq!(plan["writes"][0]["tensor"], "output_norm.weight");
    assert_eq!(plan["bytes"], 16, "{plan}");

    // An ablation: whole tensors, with their requantization cost.
    let direction = d.join("d.npy");
    let r: Vec<f32> = (0..640)
        .map(|i| ((i * 7 % 13) as f32 - 6.0) / 6.0)
        .collect();
    codec::write_tensor_npy(&direction, &[640], &r).unwrap();
    let plan = plan_then_apply(
        d,
        &[
            "ablate",
            "m.gguf",
            "--direction",
            "d.npy",
            "--layers",
            "0..1",
            "--tensors",
            "attn_output",
        ],
    );
    assert_eq!(plan["tensors"][0]["name"], "blk.0.attn_output.weight");
    assert!(plan["tensors"][0]["requantization"]["rms"].is_number());

    // A live patch: planned once on a private view (which lists the patches the
    // journal records, as the shared attach does), applied on the shared mapping as the
    // same writes, with the codec's cost and the ablation it lies over.
    let refused = Command::new(HOTPATCH)
        .current_dir(d)
        .args(["patch", "m.gguf", "--tensor", "blk.0.attn_output.weight"])
        .args(["--scale", "1.5", "--dry-run", "--json"])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "a conflicting dry run passed");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("conflicts"));
    let plan = plan_then_apply(
        d,
        &[
            "patch",
            "m.gguf",
            "--tensor",
            "blk.0.attn_output.weight",
            "--scale",
            "1.5",
            "--priority",
            "1",
        ],
    );
    assert_eq!(plan["displaces"], 1, "{plan}");
    assert_eq!(plan["writes"][0]["tensor"], "blk.0.attn_output.weight");
    assert_eq!(plan["tensor"], "blk.0.attn_output.weight");
    assert_eq!(plan["patches"][0]["tensor"], "blk.0.attn_output.weight");
    assert!(plan["rms_error"].is_number(), "{plan}");
    assert!(plan["stamp"]["sha256"].is_string(), "{plan}");
    assert_eq!(
        plan["bytes"].as_u64(),
        plan["writes"]
            .as_array()
            .map(|w| w.iter().map(|w| w["len"].as_u64().unwrap()).sum()),
    );
}

#[test]
fn rewrites_plan_then_apply_the_same_changes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copy_model(d);

    let plan = plan_then_apply(
        d,
        &[
            "meta",
            "set",
            "m.gguf",
            "general.name",
            "a name much longer than the one it had before",
        ],
    );
    assert_eq!(strings(&plan["keys_changed"]), ["general.name"]);
    let plan = plan_then_apply(d, &["meta", "delete", "m.gguf", "general.name"]);
    assert_eq!(strings(&plan["keys_removed"]), ["general.name"]);

    let plan = plan_then_apply(
        d,
        &[
            "tensor",
            "rename",
            "m.gguf",
            "output_norm.weight",
            "renamed.weight",
        ],
    );
    assert_eq!(strings(&plan["tensors_added"]), ["renamed.weight"]);
    assert_eq!(strings(&plan["tensors_removed"]), ["output_norm.weight"]);

    let plan = plan_then_apply(
        d,
        &[
            "tensor",
            "remove",
            "m.gguf",
            "blk.0.attn_q_norm.weight",
            "-o",
            "removed.gguf",
        ],
    );
    assert_eq!(plan["output"], "removed.gguf");
    let plan = plan_then_apply(
        d,
        &[
            "tensor",
            "copy",
            "m.gguf",
            "blk.0.attn_q_norm.weight",
            "removed.gguf",
            "-o",
            "grafted.gguf",
        ],
    );
    assert_eq!(
        strings(&plan["tensors_added"]),
        ["blk.0.attn_q_norm.weight"]
    );

    let plan = plan_then_apply(
        d,
        &[
            "requantize",
            "m.gguf",
            "--tensors",
            "^blk\\.0\\.attn_q\\.weight$",
            "--type",
            "Q8_0",
            "-o",
            "q8.gguf",
        ],
    );
    assert_eq!(strings(&plan["tensors_changed"]), ["blk.0.attn_q.weight"]);
    assert_eq!(
        plan["report"]["converted"][0]["name"],
        "blk.0.attn_q.weight"
    );

    let plan = plan_then_apply(
        d,
        &[
            "layers",
            "duplicate",
            "m.gguf",
            "--layers",
            "1..2",
            "--at",
            "2",
            "-o",
            "dup.gguf",
        ],
    );
    assert!(
        strings(&plan["keys_changed"])
            .iter()
            .any(|k| k.ends_with(".block_count"))
    );

    let plan = plan_then_apply(d, &["prune", "m.gguf", "--layers", "3"]);
    assert!(
        strings(&plan["tensors_removed"]).contains(&"blk.17.attn_q.weight".to_owned()),
        "{plan}"
    );
    assert_eq!(plan["report"]["blocks_after"], 17);
}

#[test]
fn new_files_plan_then_apply_the_same_content() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copy_model(d);

    let plan = plan_then_apply(
        d,
        &[
            "tensor",
            "export",
            "m.gguf",
            "output_norm.weight",
            "-o",
            "t.npy",
        ],
    );
    assert_eq!(plan["files"][0]["path"], "t.npy");

    let plan = plan_then_apply(
        d,
        &["split", "m.gguf", "part", "--split-max-tensors", "100"],
    );
    assert_eq!(plan["files"].as_array().unwrap().len(), 3);
    let plan = plan_then_apply(d, &["merge", "part-00001-of-00003.gguf", "merged.gguf"]);
    assert_eq!(plan["files"][0]["path"], "merged.gguf");

    // verify is a query that may also write a manifest: the plan is in its report.
    let before = snapshot(d);
    let report: Json = serde_json::from_str(&ok(
        d,
        &[
            "verify",
            "m.gguf",
            "--write-manifest",
            "m.txt",
            "--dry-run",
            "--json",
        ],
    ))
    .unwrap();
    assert_eq!(snapshot(d), before);
    let sha = report["plan"]["files"][0]["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(d, &["verify", "m.gguf", "--write-manifest", "m.txt"]);
    let written = std::fs::read(d.join("m.txt")).unwrap();
    assert_eq!(
        byte_tier::ops::to_hex(&byte_tier::ops::sha256(&written)),
        sha
    );
}

#[test]
fn a_plan_of_nothing_says_so_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copy_model(d);
    let before = snapshot(d);
    let text = ok(
        d,
        &[
            "bytes",
            "m.gguf",
            "--dry-run",
            "--json",
            "copy",
            "--from",
            "0",
            "--to",
            "0",
            "--len",
            "4",
        ],
    );
    let plan: Json = serde_json::from_str(&text).unwrap();
    assert_eq!(plan["changes_nothing"], true);
    assert_eq!(plan["bytes"], 0);
    assert_eq!(snapshot(d), before);
    let text = ok(
        d,
        &[
            "bytes",
            "m.gguf",
            "--dry-run",
            "fill",
            "--offset",
            "8",
            "--len",
            "4",
            "--byte",
            "1",
        ],
    );
    assert!(text.starts_with("dry run: would write 4 bytes"), "{text}");
    assert_eq!(snapshot(d), before);
}

#[test]
fn configuration_writes_plan_then_apply_the_same_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("config")).unwrap();
    std::fs::write(
        d.join("quiet.toml"),
        "name = \"quiet\"\nversion = 2\n\n[[memory_patch]]\nname = \"halve\"\n\
         tensor = \"output_norm.weight\"\ntransform = { scale = 0.5 }\n",
    )
    .unwrap();
    let plan = plan_then_apply(
        d,
        &["preset", "save", "quiet.toml", "--config-dir", "config"],
    );
    assert_eq!(plan["files"][0]["path"], "config/presets/quiet.toml");
    assert_eq!(plan["files"][0]["replaces"], false);
    ok(
        d,
        &["config", "export", "all.json", "--config-dir", "config"],
    );
    let plan = plan_then_apply(
        d,
        &["config", "import", "all.json", "--config-dir", "config"],
    );
    assert_eq!(strings(&plan["replaced"]), ["quiet"]);
    assert_eq!(plan["files"].as_array().unwrap().len(), 2);
    let plan = plan_then_apply(d, &["preset", "delete", "quiet", "--config-dir", "config"]);
    assert_eq!(plan["removes"][0], "config/presets/quiet.toml");
}

#[test]
fn live_patch_sets_plan_then_apply_the_same_writes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copy_model(d);
    std::fs::create_dir(d.join("config")).unwrap();
    std::fs::write(
        d.join("quiet.toml"),
        "name = \"quiet\"\nversion = 2\n\n[[memory_patch]]\nname = \"halve\"\n\
         tensor = \"output_norm.weight\"\ntransform = { scale = 0.5 }\n\n\
         [[memory_patch]]\nname = \"halve first\"\ntensor = \"blk.0.attn_norm.weight\"\n\
         transform = { scale = 0.5 }\n",
    )
    .unwrap();
    ok(
        d,
        &["preset", "save", "quiet.toml", "--config-dir", "config"],
    );

    // A preset: its memory patches as one planned transaction, with the report's own
    // fields (the receipts it would give, the bytes it would write).
    let plan = plan_then_apply(
        d,
        &[
            "preset",
            "apply",
            "quiet",
            "m.gguf",
            "--config-dir",
            "config",
        ],
    );
    assert_eq!(plan["preset"], "quiet");
    assert_eq!(plan["patches"].as_array().unwrap().len(), 2, "{plan}");
    assert_eq!(plan["applied"][1]["name"], "halve first");
    assert_eq!(plan["bytes_written"], plan["bytes"]);
    let tensors: Vec<&str> = plan["writes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["tensor"].as_str().unwrap())
        .collect();
    assert!(tensors.contains(&"output_norm.weight") && tensors.contains(&"blk.0.attn_norm.weight"));

    // The safety pipeline: its repairs of planted non-finite values are one planned
    // transaction; the report keeps its steps beside the plan.
    {
        use std::os::unix::fs::FileExt;
        let map = MappedFile::open(d.join("m.gguf")).unwrap();
        let gguf = map.parse().unwrap();
        let t = gguf.require_tensor("blk.1.attn_norm.weight").unwrap();
        assert_eq!(t.ggml_type, byte_tier::GgmlType::F32);
        let at = t.data_range().start;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(d.join("m.gguf"))
            .unwrap();
        file.write_all_at(&f32::NAN.to_le_bytes(), at + 8).unwrap();
        file.write_all_at(&f32::INFINITY.to_le_bytes(), at + 64)
            .unwrap();
    }
    let plan = plan_then_apply(
        d,
        &[
            "safety",
            "m.gguf",
            "--repair",
            "zero",
            "--config-dir",
            "config",
        ],
    );
    assert_eq!(plan["pipeline"], "safety");
    assert!(
        plan["steps"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["step"] == "scan"),
        "{plan}"
    );
    assert!(
        plan["writes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["tensor"] == "blk.1.attn_norm.weight"),
        "{plan}"
    );
    let map = MappedFile::open(d.join("m.gguf")).unwrap();
    let gguf = map.parse().unwrap();
    let t = gguf.require_tensor("blk.1.attn_norm.weight").unwrap();
    let values = codec::dequantize_tensor(&gguf, t, 0..t.n_elements).unwrap();
    assert!(values.iter().all(|v| v.is_finite()));
}

#[test]
fn the_optimize_pipeline_plans_then_applies_one_rewrite() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    copy_model(d);
    let plan = plan_then_apply(
        d,
        &[
            "optimize",
            "m.gguf",
            "--prune",
            "3",
            "--tensors",
            "blk\\.0\\.ffn_down",
            "--to",
            "Q8_0",
            "-o",
            "small.gguf",
        ],
    );
    // The pipeline's report (its steps) beside the rewrite plan.
    assert_eq!(plan["pipeline"], "optimize");
    let steps: Vec<&str> = plan["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["prune", "requantize", "write"]);
    // Block 3 goes and the blocks after it are renumbered: the last block's names go.
    let removed = strings(&plan["tensors_removed"]);
    assert!(
        !removed.is_empty() && removed.iter().all(|n| n.starts_with("blk.")),
        "{plan}"
    );
    assert!(
        plan["tensors_changed"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "blk.0.ffn_down.weight"),
        "{plan}"
    );
}
