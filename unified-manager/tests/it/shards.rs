//! `hotpatch split` and `hotpatch merge` against llama.cpp's `llama-gguf-split`, byte for
//! byte, on the real model.

use std::path::{Path, PathBuf};
use std::process::Command;

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");

fn run(program: &Path, args: &[&std::ffi::OsStr]) -> String {
    let output = Command::new(program).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The files `prefix-*-of-*.gguf` in `prefix`'s directory, sorted.
fn shards_of(prefix: &Path) -> Vec<PathBuf> {
    let name = prefix.file_name().unwrap().to_str().unwrap().to_owned();
    let mut shards: Vec<PathBuf> = std::fs::read_dir(prefix.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let file = p.file_name().unwrap().to_str().unwrap();
            file.starts_with(&format!("{name}-")) && file.ends_with(".gguf")
        })
        .collect();
    shards.sort();
    shards
}

fn assert_same_files(ours: &[PathBuf], theirs: &[PathBuf]) {
    assert_eq!(ours.len(), theirs.len(), "{ours:?} against {theirs:?}");
    for (a, b) in ours.iter().zip(theirs) {
        let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
        let first = x.iter().zip(&y).position(|(p, q)| p != q);
        assert!(
            x.len() == y.len() && first.is_none(),
            "{} ({} bytes) differs from {} ({} bytes) at byte {first:?}",
            a.display(),
            x.len(),
            b.display(),
            y.len()
        );
    }
}

/// Splits the real model with both tools and the same options; returns both prefixes.
fn split_both(dir: &Path, tag: &str, options: &[&str]) -> (PathBuf, PathBuf) {
    let model = tests::real_model();
    let ours = dir.join(format!("ours-{tag}"));
    let theirs = dir.join(format!("theirs-{tag}"));
    let mut args: Vec<&std::ffi::OsStr> = vec!["split".as_ref(), model.as_os_str()];
    args.push(ours.as_os_str());
    args.extend(options.iter().map(std::ffi::OsStr::new));
    run(Path::new(HOTPATCH), &args);
    let mut args: Vec<&std::ffi::OsStr> = vec!["--split".as_ref()];
    args.extend(options.iter().map(std::ffi::OsStr::new));
    args.push(model.as_os_str());
    args.push(theirs.as_os_str());
    run(&tests::llama_tool("llama-gguf-split"), &args);
    (ours, theirs)
}

#[test]
fn split_into_three_shards_equals_llama_gguf_split_and_merges_back_as_it_does() {
    let dir = tempfile::tempdir().unwrap();
    // 236 tensors, 100 per shard: three shards.
    let (ours, theirs) = split_both(dir.path(), "tensors", &["--split-max-tensors", "100"]);
    let (ours, theirs) = (shards_of(&ours), shards_of(&theirs));
    assert_eq!(ours.len(), 3);
    assert_same_files(&ours, &theirs);

    // Merging from the first shard gives llama-gguf-split --merge's bytes; both keep
    // the split keys (split.count set to 0), so neither is the original file.
    let merged_ours = dir.path().join("merged-ours.gguf");
    let merged_theirs = dir.path().join("merged-theirs.gguf");
    run(
        Path::new(HOTPATCH),
        &[
            "merge".as_ref(),
            ours[0].as_os_str(),
            merged_ours.as_os_str(),
        ],
    );
    run(
        &tests::llama_tool("llama-gguf-split"),
        &[
            "--merge".as_ref(),
            theirs[0].as_os_str(),
            merged_theirs.as_os_str(),
        ],
    );
    assert_same_files(std::slice::from_ref(&merged_ours), &[merged_theirs]);

    // The merged file holds every tensor of the original with the same bytes.
    let original = byte_tier::MappedFile::open(tests::real_model()).unwrap();
    let original = original.parse().unwrap();
    let merged = byte_tier::MappedFile::open(&merged_ours).unwrap();
    let merged = merged.parse().unwrap();
    assert_eq!(merged.tensors().len(), original.tensors().len());
    for (a, b) in original.tensors().iter().zip(merged.tensors()) {
        assert_eq!(a.name, b.name);
        assert!(
            original.tensor_data(a) == merged.tensor_data(b),
            "{}",
            a.name
        );
    }
}

#[test]
fn split_by_size_without_tensors_in_the_first_shard_equals_llama_gguf_split() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = split_both(
        dir.path(),
        "size",
        &["--split-max-size", "100M", "--no-tensor-first-split"],
    );
    let (ours, theirs) = (shards_of(&ours), shards_of(&theirs));
    assert!(ours.len() >= 3, "{ours:?}");
    assert_same_files(&ours, &theirs);
}

#[test]
fn merge_refuses_a_set_with_a_missing_shard_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("set");
    let model = tests::real_model();
    run(
        Path::new(HOTPATCH),
        &[
            "split".as_ref(),
            model.as_os_str(),
            prefix.as_os_str(),
            "--split-max-tensors".as_ref(),
            "100".as_ref(),
        ],
    );
    let shards = shards_of(&prefix);
    std::fs::remove_file(&shards[1]).unwrap();
    let out = dir.path().join("merged.gguf");
    let output = Command::new(HOTPATCH)
        .args(["merge".as_ref(), shards[2].as_os_str(), out.as_os_str()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("shard 2 of 3 is missing") && stderr.contains("set-00002-of-00003.gguf"),
        "{stderr}"
    );
    assert!(!out.exists());
}

/// The real model split by `hotpatch split` into three shards in `dir`.
fn real_model_in_three_shards(dir: &Path) -> Vec<PathBuf> {
    let prefix = dir.join("gemma");
    let model = tests::real_model();
    run(
        Path::new(HOTPATCH),
        &[
            "split".as_ref(),
            model.as_os_str(),
            prefix.as_os_str(),
            "--split-max-tensors".as_ref(),
            "100".as_ref(),
        ],
    );
    shards_of(&prefix)
}

fn hotpatch_json(args: &[&std::ffi::OsStr]) -> serde_json::Value {
    serde_json::from_str(&run(Path::new(HOTPATCH), args)).unwrap()
}

#[test]
fn read_only_commands_on_any_shard_see_the_whole_set() {
    let dir = tempfile::tempdir().unwrap();
    let shards = real_model_in_three_shards(dir.path());
    let model = tests::real_model();

    // inspect on the first shard lists every tensor of the set.
    let report = hotpatch_json(&["inspect".as_ref(), shards[0].as_os_str(), "--json".as_ref()]);
    assert_eq!(report["n_shards"], 3);
    assert_eq!(report["n_tensors"], 236);
    let listed: usize = report["shards"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["tensors"].as_object().unwrap().len())
        .sum();
    assert_eq!(listed, 236);

    // verify on the last shard writes one manifest whose digests are the original's.
    let manifest_set = dir.path().join("set.sha256");
    let manifest_model = dir.path().join("model.sha256");
    let verified = hotpatch_json(&[
        "verify".as_ref(),
        shards[2].as_os_str(),
        "--write-manifest".as_ref(),
        manifest_set.as_os_str(),
        "--json".as_ref(),
    ]);
    assert_eq!(verified["tensors"], 236);
    assert_eq!(verified["shards"], 3);
    run(
        Path::new(HOTPATCH),
        &[
            "verify".as_ref(),
            model.as_os_str(),
            "--write-manifest".as_ref(),
            manifest_model.as_os_str(),
        ],
    );
    let digests = |path: &Path| -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(|l| l.split_whitespace().nth(1).unwrap().to_owned())
            .collect()
    };
    assert_eq!(digests(&manifest_set), digests(&manifest_model));

    // diff of the original against the middle shard compares every tensor of the set:
    // only the split keys differ.
    let d = hotpatch_json(&[
        "diff".as_ref(),
        model.as_os_str(),
        shards[1].as_os_str(),
        "--json".as_ref(),
    ]);
    assert_eq!(d["tensors_unchanged"], 236, "{d}");
    assert_eq!(d["tensors_changed"].as_array().unwrap().len(), 0, "{d}");
    assert_eq!(
        d["keys_added"],
        serde_json::json!(["split.no", "split.tensors.count", "split.count"])
    );

    // tensor export through the first shard's name finds a tensor of the last shard.
    let last = byte_tier::MappedFile::open(&shards[2]).unwrap();
    let name = last.parse().unwrap().tensors()[0].name.clone();
    let from_set = dir.path().join("set.npy");
    let from_model = dir.path().join("model.npy");
    for (file, out) in [(&shards[0], &from_set), (&model, &from_model)] {
        run(
            Path::new(HOTPATCH),
            &[
                "tensor".as_ref(),
                "export".as_ref(),
                file.as_os_str(),
                name.as_ref(),
                "-o".as_ref(),
                out.as_os_str(),
            ],
        );
    }
    assert_eq!(
        std::fs::read(&from_set).unwrap(),
        std::fs::read(&from_model).unwrap()
    );
}

#[test]
fn a_patch_through_the_first_shard_changes_only_the_shard_that_holds_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let shards = real_model_in_three_shards(dir.path());
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    let last = byte_tier::MappedFile::open(&shards[2]).unwrap();
    let gguf = last.parse().unwrap();
    let tensor = gguf
        .tensors()
        .iter()
        .find(|t| t.ggml_type == byte_tier::GgmlType::F32)
        .unwrap()
        .clone();
    drop(gguf);
    drop(last);
    run(
        Path::new(HOTPATCH),
        &[
            "patch".as_ref(),
            shards[0].as_os_str(),
            "--tensor".as_ref(),
            tensor.name.as_ref(),
            "--scale".as_ref(),
            "2".as_ref(),
        ],
    );
    assert_eq!(std::fs::read(&shards[0]).unwrap(), before[0]);
    assert_eq!(std::fs::read(&shards[1]).unwrap(), before[1]);
    let after = std::fs::read(&shards[2]).unwrap();
    let range = tensor.data_range();
    let (start, end) = (range.start as usize, range.end as usize);
    assert_eq!(after[..start], before[2][..start]);
    assert_eq!(after[end..], before[2][end..]);
    let old = f32::from_le_bytes(before[2][start..start + 4].try_into().unwrap());
    let new = f32::from_le_bytes(after[start..start + 4].try_into().unwrap());
    assert_eq!(new, old * 2.0);
}

#[test]
fn meta_on_any_shard_edits_the_first_shard_and_leaves_the_split_keys_alone() {
    let dir = tempfile::tempdir().unwrap();
    let shards = real_model_in_three_shards(dir.path());
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    run(
        Path::new(HOTPATCH),
        &[
            "meta".as_ref(),
            "set".as_ref(),
            shards[2].as_os_str(),
            "general.name".as_ref(),
            "sharded".as_ref(),
        ],
    );
    let got = run(
        Path::new(HOTPATCH),
        &[
            "meta".as_ref(),
            "get".as_ref(),
            shards[1].as_os_str(),
            "general.name".as_ref(),
        ],
    );
    assert_eq!(got.trim(), "sharded");
    assert_ne!(std::fs::read(&shards[0]).unwrap(), before[0]);
    assert_eq!(std::fs::read(&shards[1]).unwrap(), before[1]);
    assert_eq!(std::fs::read(&shards[2]).unwrap(), before[2]);
    // Each shard answers for its own split keys, and meta does not change them.
    let no = run(
        Path::new(HOTPATCH),
        &[
            "meta".as_ref(),
            "get".as_ref(),
            shards[2].as_os_str(),
            "split.no".as_ref(),
        ],
    );
    assert_eq!(no.trim(), "2");
    let output = Command::new(HOTPATCH)
        .args([
            "meta".as_ref(),
            "set".as_ref(),
            shards[1].as_os_str(),
            "split.count".as_ref(),
            "4".as_ref(),
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("split.count is part of the shard set"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(std::fs::read(&shards[1]).unwrap(), before[1]);
}

/// Every tensor of a set (or of one file), by name: type, dimensions and data.
fn tensor_table(
    any: &Path,
) -> std::collections::BTreeMap<String, (byte_tier::GgmlType, Vec<u64>, Vec<u8>)> {
    let files: Vec<byte_tier::MappedFile> = match byte_tier::split::open_set_of(any).unwrap() {
        Some(set) => set.into_files(),
        None => vec![byte_tier::MappedFile::open(any).unwrap()],
    };
    let mut table = std::collections::BTreeMap::new();
    for file in &files {
        let gguf = file.parse().unwrap();
        for t in gguf.tensors() {
            table.insert(
                t.name.clone(),
                (t.ggml_type, t.dims.clone(), gguf.tensor_data(t).to_vec()),
            );
        }
    }
    table
}

/// `split.tensors.count` as each shard of the set says it.
fn split_counts(shards: &[PathBuf]) -> Vec<u64> {
    shards
        .iter()
        .map(|s| {
            let file = byte_tier::MappedFile::open(s).unwrap();
            let gguf = file.parse().unwrap();
            gguf.get("split.tensors.count").unwrap().as_u64().unwrap()
        })
        .collect()
}

fn os(args: &[&str]) -> Vec<std::ffi::OsString> {
    args.iter().map(Into::into).collect()
}

fn hotpatch(args: &[std::ffi::OsString]) -> String {
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    run(Path::new(HOTPATCH), &args)
}

#[test]
fn prune_and_requantize_of_a_set_equal_the_same_edit_of_the_single_file_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let shards = real_model_in_three_shards(dir.path());
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    let model = tests::real_model();
    let p = |name: &str| dir.path().join(name).into_os_string();

    // A dry run on the middle shard plans every shard and writes nothing.
    let mut args = vec!["prune".into(), shards[1].clone().into_os_string()];
    args.extend(os(&["--layers", "3,7", "--dry-run", "--json"]));
    let plan: serde_json::Value = serde_json::from_str(&hotpatch(&args)).unwrap();
    assert_eq!(plan["kind"], "set_rewrite");
    assert_eq!(plan["files"].as_array().unwrap().len(), 3);
    let after: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    assert!(before == after, "a dry run changed a shard");

    // Prune into a new set, and the same prune of the single file.
    args.truncate(4);
    args.extend(["-o".into(), p("pruned.gguf")]);
    hotpatch(&args);
    hotpatch(&[
        "prune".into(),
        model.clone().into_os_string(),
        "--layers".into(),
        "3,7".into(),
        "-o".into(),
        p("single.gguf"),
    ]);
    let pruned = shards_of(&dir.path().join("pruned"));
    assert_eq!(pruned.len(), 3);
    assert_eq!(split_counts(&pruned), vec![210, 210, 210]);
    assert!(tensor_table(&pruned[2]) == tensor_table(&dir.path().join("single.gguf")));
    let after: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    assert!(
        before == after,
        "a rewrite into a new set changed the old one"
    );

    // Requantize in place, given the last shard, and the same of the single file.
    let regex = "ffn_down";
    hotpatch(&[
        "requantize".into(),
        shards[2].clone().into_os_string(),
        "--tensors".into(),
        regex.into(),
        "--type".into(),
        "Q8_0".into(),
    ]);
    hotpatch(&[
        "requantize".into(),
        model.into_os_string(),
        "--tensors".into(),
        regex.into(),
        "--type".into(),
        "Q8_0".into(),
        "-o".into(),
        p("single-q8.gguf"),
    ]);
    assert!(tensor_table(&shards[0]) == tensor_table(&dir.path().join("single-q8.gguf")));
    assert_eq!(split_counts(&shards), vec![236, 236, 236]);

    // llama-server loads both new sets from their first shard and generates.
    for first in [&pruned[0], &shards[0]] {
        let server = tests::LlamaServer::start(first, &[]);
        let body = r#"{"prompt": "Once upon a time", "n_predict": 4, "temperature": 0}"#;
        let (status, answer) =
            tests::http_request(server.port, "POST", "/completion", Some(body)).unwrap();
        assert_eq!(status, 200, "{}: {answer}", first.display());
        let json: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert!(!json["content"].as_str().unwrap().is_empty());
    }
}

#[test]
fn a_set_rewrite_killed_between_renames_is_refused_until_recover_finishes_it() {
    use std::os::unix::process::ExitStatusExt;
    let dir = tempfile::tempdir().unwrap();
    let shards = real_model_in_three_shards(dir.path());
    let status = Command::new(HOTPATCH)
        .args(["tensor", "remove"])
        .arg(&shards[0])
        .arg("blk.0.attn_q.weight")
        .env("HOTPATCH_FAILPOINT", "set-rewrite-renamed-first")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.signal(), Some(6), "the failpoint aborts: {status}");
    // The first shard is new and the others are old: the set disagrees with itself, and
    // every command refuses it, naming the way out.
    let inspect = Command::new(HOTPATCH)
        .arg("inspect")
        .arg(&shards[1])
        .output()
        .unwrap();
    assert_eq!(inspect.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&inspect.stderr);
    assert!(
        stderr.contains("interrupted") && stderr.contains("hotpatch recover"),
        "{stderr}"
    );
    // A dry run of recover says what it would do and does nothing.
    let dry = hotpatch(&[
        "recover".into(),
        shards[2].clone().into_os_string(),
        "--dry-run".into(),
        "--json".into(),
    ]);
    let dry: serde_json::Value = serde_json::from_str(&dry).unwrap();
    assert_eq!(dry["kind"], "set_recovery");
    assert_eq!(dry["renames"].as_array().unwrap().len(), 2);
    assert!(byte_tier::split::ShardSet::open(&shards[0]).is_err());
    hotpatch(&["recover".into(), shards[2].clone().into_os_string()]);
    let table = tensor_table(&shards[0]);
    assert_eq!(table.len(), 235);
    assert!(!table.contains_key("blk.0.attn_q.weight"));
    assert_eq!(split_counts(&shards), vec![235, 235, 235]);
    let stray: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with(".hotpatch-"))
        .collect();
    assert!(stray.is_empty(), "{stray:?}");
}

/// The first F32 tensor of `shard`: its name and the absolute offset of its data.
fn first_f32_tensor(shard: &Path) -> (String, u64) {
    let map = byte_tier::MappedFile::open(shard).unwrap();
    let gguf = map.parse().unwrap();
    let t = gguf
        .tensors()
        .iter()
        .find(|t| t.ggml_type == byte_tier::GgmlType::F32)
        .unwrap();
    (t.name.clone(), t.data_range().start)
}

#[test]
fn safety_on_a_set_repairs_every_shard_as_one_transaction() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let shards = real_model_in_three_shards(dir.path());
    // A NaN in the first shard and an infinity in the last.
    let planted = [(0, f32::NAN), (2, f32::INFINITY)].map(|(index, value)| {
        let (name, offset) = first_f32_tensor(&shards[index]);
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&shards[index])
            .unwrap();
        file.write_all_at(&value.to_le_bytes(), offset).unwrap();
        (index, name, offset)
    });
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    let manifest = dir.path().join("set.manifest");
    // verify writes the set's manifest, and fails on the planted values.
    let verified = Command::new(HOTPATCH)
        .args(["verify", shards[0].to_str().unwrap(), "--write-manifest"])
        .arg(&manifest)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&verified.stdout);
    assert!(
        !verified.status.success() && printed.contains("wrote 236 tensor digests"),
        "{printed}"
    );
    let args = [
        "safety",
        shards[1].to_str().unwrap(),
        "--repair",
        "zero",
        "--manifest",
        manifest.to_str().unwrap(),
    ];

    // The dry run plans both repairs, in their shards, and writes nothing.
    let dry: serde_json::Value =
        serde_json::from_str(&hotpatch(&os(
            &[&args[..], &["--dry-run", "--json"]].concat()
        )))
        .unwrap();
    assert_eq!(dry["kind"], "in_place_set");
    let mut planned: Vec<&str> = dry["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    planned.sort_unstable();
    let mut expected: Vec<&str> = planted.iter().map(|(_, n, _)| n.as_str()).collect();
    expected.sort_unstable();
    assert_eq!(planned, expected);
    assert_unchanged(&shards, &before);

    // Killed after the first shard's bytes: recovery puts every shard back.
    let args_os = os(&args);
    let args_os: Vec<&std::ffi::OsStr> = args_os.iter().map(|a| a.as_os_str()).collect();
    killed_at("set-between-shards", &args_os);
    hotpatch(&os(&["recover", shards[2].to_str().unwrap()]));
    assert_unchanged(&shards, &before);

    // Applied: the manifest matches, both values are zero, the middle shard is untouched,
    // and the set transaction reverts byte for byte.
    let report: serde_json::Value =
        serde_json::from_str(&hotpatch(&os(&[&args[..], &["--json"]].concat()))).unwrap();
    let step = |name: &str| {
        report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["step"] == name)
            .unwrap()
            .clone()
    };
    assert_eq!(step("integrity")["result"]["status"], "ok", "{report}");
    assert_eq!(step("write")["result"]["status"], "ok", "{report}");
    for (index, _, offset) in &planted {
        let bytes = std::fs::read(&shards[*index]).unwrap();
        assert_eq!(
            &bytes[*offset as usize..*offset as usize + 4],
            &[0, 0, 0, 0]
        );
    }
    assert!(std::fs::read(&shards[1]).unwrap() == before[1]);
    let transaction = report["undo"]["set_transaction"].as_u64().unwrap();
    hotpatch(&os(&[
        "revert",
        "--set",
        shards[2].to_str().unwrap(),
        &transaction.to_string(),
    ]));
    assert_unchanged(&shards, &before);
}

#[test]
fn boost_on_a_shard_warms_every_shard_of_the_set() {
    let dir = tempfile::tempdir().unwrap();
    let shards = real_model_in_three_shards(dir.path());
    let total: u64 = shards
        .iter()
        .map(|s| std::fs::metadata(s).unwrap().len())
        .sum();
    let report: serde_json::Value = serde_json::from_str(&hotpatch(&os(&[
        "boost",
        shards[1].to_str().unwrap(),
        "--json",
    ])))
    .unwrap();
    let step = |name: &str| {
        report["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["step"] == name)
            .unwrap()
            .clone()
    };
    for name in ["cold_read", "will_need", "warm_read"] {
        assert_eq!(step(name)["bytes"], total, "{name}: {report}");
    }
    assert!(
        step("will_need")["changed"]
            .as_str()
            .unwrap()
            .contains("in 3 shards"),
        "{report}"
    );
}

/// A preset that changes a tensor in the first shard and one in the last, and writes
/// two bytes into a third by a tensor-relative byte patch.
const SET_PRESET: &str = r#"
name = "reach"
version = 1

[[memory_patch]]
name = "halve-embeddings"
tensor = "token_embd.weight"
transform = { scale = 0.5 }

[[memory_patch]]
name = "nudge-last-down"
tensor = "blk.17.ffn_down.weight"
transform = { offset = 0.001 }

[[byte_patch]]
id = "b1"
name = "mark-last-norm"
target = { kind = "tensor", tensor = "output_norm.weight", start = 0, end = 2 }
operation = { op = "fill", byte = 0 }
"#;

#[test]
fn preset_apply_on_a_shard_patches_every_shard_as_one_set_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let shards = real_model_in_three_shards(dir.path());
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    let config = dir.path().join("config");
    let preset = dir.path().join("reach.toml");
    std::fs::write(&preset, SET_PRESET).unwrap();
    let with_config = |args: &[&str]| {
        Command::new(HOTPATCH)
            .args(args)
            .env("HOTPATCH_CONFIG_DIR", &config)
            .output()
            .unwrap()
    };
    let ok = |args: &[&str]| {
        let output = with_config(args);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    ok(&["preset", "save", preset.to_str().unwrap()]);

    // The same preset on the single file, for comparison.
    let single = dir.path().join("single.gguf");
    std::fs::copy(tests::real_model(), &single).unwrap();
    ok(&["preset", "apply", "reach", single.to_str().unwrap()]);

    let shard = shards[1].to_str().unwrap();
    let dry: serde_json::Value = serde_json::from_str(&ok(&[
        "preset",
        "apply",
        "reach",
        shard,
        "--dry-run",
        "--json",
    ]))
    .unwrap();
    assert_eq!(dry["kind"], "in_place_set");
    assert_eq!(dry["parts"].as_array().unwrap().len(), 2, "{dry}");
    assert_unchanged(&shards, &before);

    let applied: serde_json::Value =
        serde_json::from_str(&ok(&["preset", "apply", "reach", shard, "--json"])).unwrap();
    let (ours, theirs) = (
        tensor_data(&shards),
        tensor_data(std::slice::from_ref(&single)),
    );
    for (name, data) in &theirs {
        assert!(
            &ours[name] == data,
            "{name} differs from the single-file preset"
        );
    }
    assert!(std::fs::read(&shards[1]).unwrap() == before[1]);
    let transaction = applied["set_transaction"].as_u64().unwrap();
    hotpatch(&os(&["revert", "--set", shard, &transaction.to_string()]));
    assert_unchanged(&shards, &before);

    // A patch addressed by absolute offsets names no shard: refused, nothing written.
    let offsets = dir.path().join("offsets.toml");
    std::fs::write(
        &offsets,
        "name = \"offsets\"\nversion = 1\n[[byte_patch]]\nid = \"b\"\nname = \"raw\"\n\
         target = { kind = \"offset\", offset = 64, len = 2 }\noperation = { op = \"fill\", byte = 0 }\n",
    )
    .unwrap();
    ok(&["preset", "save", offsets.to_str().unwrap()]);
    let refused = with_config(&["preset", "apply", "offsets", shard]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success());
    assert!(stderr.contains("name no shard of a set"), "{stderr}");
    assert_unchanged(&shards, &before);
}

#[test]
fn layers_duplicate_of_a_set_writes_a_new_set_equal_to_the_single_file_duplication() {
    let dir = tempfile::tempdir().unwrap();
    let shards = real_model_in_three_shards(dir.path());
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    let duplicate = |input: &Path, out: &Path| {
        hotpatch(&os(&[
            "layers",
            "duplicate",
            input.to_str().unwrap(),
            "--layers",
            "2..5",
            "--at",
            "12",
            "-o",
            out.to_str().unwrap(),
        ]))
    };
    let single_out = dir.path().join("single-dup.gguf");
    duplicate(&tests::real_model(), &single_out);
    let printed = duplicate(&shards[2], &dir.path().join("dup.gguf"));
    assert!(printed.contains("blocks 18 -> 21"), "{printed}");
    let new_set = shards_of(&dir.path().join("dup"));
    assert_eq!(new_set.len(), 3, "{new_set:?}");
    let (ours, theirs) = (
        tensor_data(&new_set),
        tensor_data(std::slice::from_ref(&single_out)),
    );
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (name, data) in &theirs {
        assert!(
            &ours[name] == data,
            "{name} differs from the single-file duplication"
        );
    }
    assert_eq!(split_counts(&new_set), vec![theirs.len() as u64; 3]);
    // The first shard holds the model's metadata, as the single file does.
    let metadata = |path: &Path| {
        let map = byte_tier::MappedFile::open(path).unwrap();
        let gguf = map.parse().unwrap();
        gguf.metadata()
            .iter()
            .filter(|e| !e.key.to_string_lossy().starts_with("split."))
            .map(|e| {
                (
                    e.key.to_string_lossy().into_owned(),
                    format!("{:?}", e.value),
                )
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(metadata(&new_set[0]), metadata(&single_out));
    assert_unchanged(&shards, &before);

    // llama-server loads the new set from its first shard and generates.
    let server = tests::LlamaServer::start(&new_set[0], &[]);
    let body = r#"{"prompt": "Once upon a time", "n_predict": 4, "temperature": 0}"#;
    let (status, answer) =
        tests::http_request(server.port, "POST", "/completion", Some(body)).unwrap();
    assert_eq!(status, 200, "{answer}");
    let json: serde_json::Value = serde_json::from_str(&answer).unwrap();
    assert!(!json["content"].as_str().unwrap().is_empty());
}

/// Fails naming the first of `shards` whose bytes are not `before`'s.
fn assert_unchanged(shards: &[PathBuf], before: &[Vec<u8>]) {
    for (shard, bytes) in shards.iter().zip(before) {
        assert!(
            &std::fs::read(shard).unwrap() == bytes,
            "{} changed",
            shard.display()
        );
    }
}

/// Every tensor's data over the files given, by name.
fn tensor_data(files: &[PathBuf]) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    for file in files {
        let map = byte_tier::MappedFile::open(file).unwrap();
        let gguf = map.parse().unwrap();
        for t in gguf.tensors() {
            out.insert(t.name.clone(), gguf.tensor_data(t).to_vec());
        }
    }
    out
}

/// Runs hotpatch stopped on purpose at `failpoint`, as a kill there would stop it.
fn killed_at(failpoint: &str, args: &[&std::ffi::OsStr]) {
    let output = Command::new(HOTPATCH)
        .args(args)
        .env("HOTPATCH_FAILPOINT", failpoint)
        .output()
        .unwrap();
    assert!(
        !output.status.success(),
        "{failpoint}: {}",
        String::from_utf8_lossy(&output.stdout)
    );
}

#[test]
fn a_lora_merge_into_a_set_is_one_transaction_that_a_kill_leaves_on_one_side() {
    let dir = tempfile::tempdir().unwrap();
    let shards = real_model_in_three_shards(dir.path());
    let adapter = dir.path().join("adapter.gguf");
    tests::write_lora_adapter(&tests::real_model(), &adapter, 4);
    // The same merge into the single file is what the set must hold afterwards.
    let single = dir.path().join("single.gguf");
    std::fs::copy(tests::real_model(), &single).unwrap();
    let merge = |file: &Path| -> Vec<std::ffi::OsString> {
        os(&[
            "lora",
            "merge",
            file.to_str().unwrap(),
            adapter.to_str().unwrap(),
        ])
    };
    hotpatch(&merge(&single));
    let merged_single = tensor_data(std::slice::from_ref(&single));
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    let args = merge(&shards[1]);
    let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();

    // Killed after the first shard's new bytes are written, before the set's decision:
    // a shard is half-merged until recovery rolls every shard back.
    killed_at("set-between-shards", &args);
    let changed = shards
        .iter()
        .zip(&before)
        .filter(|(s, b)| &&std::fs::read(s).unwrap() != b)
        .count();
    assert_eq!(changed, 1, "one shard written before the kill");
    let recovered = hotpatch(&os(&["recover", shards[2].to_str().unwrap()]));
    assert!(recovered.contains("rolled back"), "{recovered}");
    assert_unchanged(&shards, &before);

    // Killed after the decision: every shard has its bytes, and recovery completes the
    // parts, whichever shard it is given.
    killed_at("set-after-decision", &args);
    let recovered = hotpatch(&os(&["recover", shards[0].to_str().unwrap()]));
    assert!(recovered.contains("completed"), "{recovered}");
    let merged_set = tensor_data(&shards);
    assert_eq!(merged_set.len(), merged_single.len());
    for (name, data) in &merged_single {
        assert!(
            &merged_set[name] == data,
            "{name} differs from the single-file merge"
        );
    }
    let written: Vec<usize> = (0..shards.len())
        .filter(|&i| std::fs::read(&shards[i]).unwrap() != before[i])
        .collect();
    assert!(
        written.len() >= 2,
        "the adapter's targets span shards: {written:?}"
    );

    // The unmerge is a set transaction too, and restores every shard byte for byte.
    let unmerged = hotpatch(&os(&[
        "lora",
        "unmerge",
        shards[2].to_str().unwrap(),
        adapter.to_str().unwrap(),
    ]));
    assert!(unmerged.contains("of the set"), "{unmerged}");
    assert_unchanged(&shards, &before);
}

#[test]
fn a_llama_server_that_loaded_the_set_sees_a_patch_to_its_last_shard_live() {
    let dir = tempfile::tempdir().unwrap();
    let shards = real_model_in_three_shards(dir.path());
    let last = tensor_data(std::slice::from_ref(&shards[2]));
    let tensor = last
        .keys()
        .find(|name| name.ends_with("ffn_down.weight"))
        .expect("a ffn_down tensor in the last shard")
        .clone();
    let server = tests::LlamaServer::start(&shards[0], &[]);
    let ask = || {
        let body = r#"{"prompt": "The capital of France is", "n_predict": 1, "n_probs": 5,
            "temperature": 0, "cache_prompt": false}"#;
        let (status, answer) =
            tests::http_request(server.port, "POST", "/completion", Some(body)).unwrap();
        assert_eq!(status, 200, "{answer}");
        let json: serde_json::Value = serde_json::from_str(&answer).unwrap();
        json["completion_probabilities"][0]["top_logprobs"].clone()
    };
    let before = ask();
    let first = shards[0].to_str().unwrap();
    let patched = hotpatch(&os(&["patch", first, "--tensor", &tensor, "--zero"]));
    assert!(patched.contains(&tensor), "{patched}");
    assert!(
        ask() != before,
        "the server did not see the patch to {tensor}"
    );
    // The patch is the first transaction of the last shard's journal.
    hotpatch(&os(&["revert", shards[2].to_str().unwrap(), "1"]));
    assert_eq!(ask(), before);
}

#[test]
fn an_ablation_of_a_set_equals_the_single_file_ablation_and_reverts_as_a_set() {
    let dir = tempfile::tempdir().unwrap();
    let shards = real_model_in_three_shards(dir.path());
    let single = dir.path().join("single.gguf");
    std::fs::copy(tests::real_model(), &single).unwrap();
    let direction = dir.path().join("r.npy");
    let r: Vec<f32> = (0..640)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
        .collect();
    byte_tier::codec::write_tensor_npy(&direction, &[640], &r).unwrap();
    let ablate = |file: &Path| {
        hotpatch(&os(&[
            "ablate",
            file.to_str().unwrap(),
            "--direction",
            direction.to_str().unwrap(),
            "--tensors",
            "attn_output,ffn_down",
            "--layers",
            "10..18",
        ]))
    };
    ablate(&single);
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    let report = ablate(&shards[0]);
    assert!(report.contains("revert --set"), "{report}");
    let (ours, theirs) = (
        tensor_data(&shards),
        tensor_data(std::slice::from_ref(&single)),
    );
    for (name, data) in &theirs {
        assert!(
            &ours[name] == data,
            "{name} differs from the single-file ablation"
        );
    }
    let written = (0..3)
        .filter(|&i| std::fs::read(&shards[i]).unwrap() != before[i])
        .count();
    assert!(written >= 2, "layers 10..18 lie in more than one shard");
    let reverted = hotpatch(&os(&[
        "revert",
        "--set",
        shards[1].to_str().unwrap(),
        "--last",
    ]));
    assert!(reverted.contains("reverted set transaction"), "{reverted}");
    assert_unchanged(&shards, &before);
}

#[test]
fn optimize_of_a_set_writes_a_new_set_equal_to_the_single_file_optimize() {
    let dir = tempfile::tempdir().unwrap();
    let shards = real_model_in_three_shards(dir.path());
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    let single_out = dir.path().join("single-optimized.gguf");
    let optimize = |input: &Path, out: &Path| {
        hotpatch(&os(&[
            "optimize",
            input.to_str().unwrap(),
            "--prune",
            "3,12",
            "--tensors",
            r"ffn_down\.weight",
            "--to",
            "Q8_0",
            "-o",
            out.to_str().unwrap(),
        ]))
    };
    optimize(&tests::real_model(), &single_out);
    let printed = optimize(&shards[1], &dir.path().join("opt.gguf"));
    assert!(
        printed.contains("requantize:") && printed.contains("prune:"),
        "{printed}"
    );
    let new_set = shards_of(&dir.path().join("opt"));
    assert_eq!(new_set.len(), 3, "{new_set:?}");
    let (ours, theirs) = (tensor_data(&new_set), tensor_data(&[single_out]));
    assert_eq!(ours.len(), theirs.len());
    for (name, data) in &theirs {
        assert!(
            &ours[name] == data,
            "{name} differs from the single-file optimize"
        );
    }
    assert_eq!(split_counts(&new_set), vec![theirs.len() as u64; 3]);
    assert_unchanged(&shards, &before);
}
