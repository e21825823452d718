//! Shard naming, split planning and writing, merging, and every way a shard set can be
//! broken, on small generated files.

use std::path::Path;

use super::*;
use crate::split::transaction::ShardWrites;
use crate::types::GgmlType;
use crate::value::Value;
use crate::writer::{GgufWriter, TensorSpec};

/// A file of five F32 tensors of 8, 16, 24, 32 and 40 elements (element i of tensor t is
/// t * 100 + i), one of them stored with a trailing dimension of 1, and an alignment of
/// 64 that the first shard keeps.
fn five_tensors(dir: &Path) -> PathBuf {
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama")
        .set("general.alignment", Value::U32(64))
        .set("llama.block_count", Value::U32(2));
    for t in 0..5u32 {
        let n = 8 * (t + 1);
        let bytes: Vec<u8> = (0..n)
            .flat_map(|i| ((t * 100 + i) as f32).to_le_bytes())
            .collect();
        let dims = if t == 2 {
            vec![u64::from(n), 1]
        } else {
            vec![u64::from(n)]
        };
        w.add_tensor(TensorSpec::from_bytes(
            format!("t{t}"),
            dims,
            GgmlType::F32,
            bytes,
        ));
    }
    let path = dir.join("model.gguf");
    w.write_to_path(&path).unwrap();
    path
}

fn split_into(source: &Path, prefix: &Path, options: &SplitOptions) -> Vec<OutputFile> {
    let file = MappedFile::open(source).unwrap();
    let gguf = file.parse().unwrap();
    SplitPlan::new(&gguf, prefix, options)
        .unwrap()
        .write(&gguf, source)
        .unwrap()
}

fn tensors_of(path: &Path) -> Vec<String> {
    let file = MappedFile::open(path).unwrap();
    let gguf = file.parse().unwrap();
    gguf.tensors().iter().map(|t| t.name.clone()).collect()
}

#[test]
fn shard_names_round_trip_and_only_the_canonical_spelling_parses() {
    let path = shard_path(Path::new("dir/model"), 1, 3);
    assert_eq!(path, Path::new("dir/model-00002-of-00003.gguf"));
    assert_eq!(
        parse_shard_name(&path),
        Some(ShardName {
            prefix: PathBuf::from("dir/model"),
            index: 1,
            count: 3
        })
    );
    for bad in [
        "model-2-of-3.gguf",
        "model-00000-of-00003.gguf",
        "model-00004-of-00003.gguf",
        "model-00001-of-00003.bin",
        "model.gguf",
    ] {
        assert_eq!(parse_shard_name(Path::new(bad)), None, "{bad}");
    }
}

#[test]
fn a_split_by_tensor_count_makes_a_set_that_merges_back() {
    let dir = tempfile::tempdir().unwrap();
    let source = five_tensors(dir.path());
    let prefix = dir.path().join("out");
    let options = SplitOptions {
        limit: SplitLimit::Tensors(2),
        no_tensor_first_split: false,
    };
    let outputs = split_into(&source, &prefix, &options);
    assert_eq!(outputs.len(), 3);
    assert_eq!(tensors_of(&outputs[0].path), ["t0", "t1"]);
    assert_eq!(tensors_of(&outputs[2].path), ["t4"]);
    for output in &outputs {
        let len = std::fs::metadata(&output.path).unwrap().len();
        assert_eq!(len, output.n_bytes);
        assert_eq!(len % SPLIT_ALIGNMENT, 0);
    }
    // The first shard keeps the file's 64-byte alignment, the others the default.
    let first_tensor_offset = |path: &Path| {
        let file = MappedFile::open(path).unwrap();
        let gguf = file.parse().unwrap();
        (gguf.alignment(), gguf.data_offset())
    };
    let (alignment, data_offset) = first_tensor_offset(&outputs[0].path);
    assert_eq!((alignment, data_offset % 64), (64, 0));
    assert_eq!(first_tensor_offset(&outputs[1].path).0, 32);

    // The general keys stay in the first shard; the split keys come last everywhere.
    let first = MappedFile::open(&outputs[0].path).unwrap();
    let gguf = first.parse().unwrap();
    let keys: Vec<&str> = gguf
        .metadata()
        .iter()
        .map(|e| e.key.as_str().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "general.architecture",
            "general.alignment",
            "llama.block_count",
            "split.no",
            "split.tensors.count",
            "split.count"
        ]
    );
    assert_eq!(gguf.get("split.count").and_then(|v| v.as_u64()), Some(3));
    assert_eq!(
        gguf.get("split.tensors.count"),
        Some(crate::ValueRef::I32(5))
    );
    let last = MappedFile::open(&outputs[2].path).unwrap();
    let gguf = last.parse().unwrap();
    assert_eq!(gguf.metadata().len(), 3);
    assert_eq!(gguf.get("split.no"), Some(crate::ValueRef::U16(2)));

    // Any shard resolves the set; the merge holds every tensor's bytes, t2 with its
    // trailing 1 dropped as ggml writes it.
    let set = ShardSet::open(&outputs[1].path).unwrap();
    assert_eq!(set.n_tensors(), 5);
    let merged = dir.path().join("merged.gguf");
    let report = merge(&set, &merged).unwrap();
    assert_eq!(report.n_bytes, std::fs::metadata(&merged).unwrap().len());
    assert_eq!(plan_merge(&set, &merged).unwrap().n_bytes, report.n_bytes);
    let original = MappedFile::open(&source).unwrap();
    let original = original.parse().unwrap();
    let merged_file = MappedFile::open(&merged).unwrap();
    let merged_gguf = merged_file.parse().unwrap();
    assert_eq!(
        merged_gguf.get("split.count"),
        Some(crate::ValueRef::U16(0))
    );
    for (a, b) in original.tensors().iter().zip(merged_gguf.tensors()) {
        assert_eq!(a.name, b.name);
        assert_eq!(original.tensor_data(a), merged_gguf.tensor_data(b));
    }
    assert_eq!(merged_gguf.tensor("t2").unwrap().dims, [24]);

    // Merging again onto an existing file is refused.
    let err = merge(&set, &merged).unwrap_err();
    assert!(matches!(err, Error::OutputExists { .. }), "{err}");
}

#[test]
fn a_split_copied_by_the_kernel_equals_one_written_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let source = five_tensors(dir.path());
    let options = SplitOptions {
        limit: SplitLimit::Tensors(2),
        no_tensor_first_split: false,
    };
    let mapped = split_into(&source, &dir.path().join("mapped"), &options);
    let bytes = std::fs::read(&source).unwrap();
    let in_memory = Gguf::parse(&bytes).unwrap();
    assert!(in_memory.source_file().is_none());
    let written = SplitPlan::new(&in_memory, &dir.path().join("memory"), &options)
        .unwrap()
        .write(&in_memory, &source)
        .unwrap();
    assert_eq!(mapped.len(), written.len());
    for (a, b) in mapped.iter().zip(&written) {
        assert_eq!(
            std::fs::read(&a.path).unwrap(),
            std::fs::read(&b.path).unwrap()
        );
    }
}

#[test]
fn a_split_by_size_starts_a_shard_before_the_padded_size_passes_the_limit() {
    let dir = tempfile::tempdir().unwrap();
    let source = five_tensors(dir.path());
    let file = MappedFile::open(&source).unwrap();
    let gguf = file.parse().unwrap();
    // Padded sizes: 32, 64, 96, 128, 160. A 200-byte limit: [t0 t1 t2] [t3] [t4].
    let plan = SplitPlan::new(
        &gguf,
        &dir.path().join("s"),
        &SplitOptions {
            limit: SplitLimit::Bytes(200),
            no_tensor_first_split: true,
        },
    )
    .unwrap();
    let outputs = plan.outputs(&gguf).unwrap();
    let counts: Vec<u64> = outputs.iter().map(|o| o.n_tensors).collect();
    assert_eq!(counts, [0, 3, 1, 1]);
    // Nothing was written by planning.
    assert!(!outputs[0].path.exists());

    // A limit below the first tensor's size would leave a shard empty.
    let err = SplitPlan::new(
        &gguf,
        &dir.path().join("s"),
        &SplitOptions {
            limit: SplitLimit::Bytes(16),
            no_tensor_first_split: false,
        },
    )
    .unwrap_err();
    assert!(matches!(err, Error::InvalidSplit { .. }), "{err}");
}

#[test]
fn split_sizes_parse_as_gguf_split_reads_them() {
    assert_eq!(
        SplitLimit::parse_size("500M").unwrap(),
        SplitLimit::Bytes(500_000_000)
    );
    assert_eq!(
        SplitLimit::parse_size("2G").unwrap(),
        SplitLimit::Bytes(2_000_000_000)
    );
    for bad in ["500", "0M", "-1G", "1.5G", "M", ""] {
        let err = SplitLimit::parse_size(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidSplit { .. }), "{bad}: {err}");
    }
}

/// A three-shard set of the five-tensor file in `dir`, and its paths.
fn three_shards(dir: &Path, name: &str) -> Vec<PathBuf> {
    let source = five_tensors(dir);
    let options = SplitOptions {
        limit: SplitLimit::Tensors(2),
        no_tensor_first_split: false,
    };
    split_into(&source, &dir.join(name), &options)
        .into_iter()
        .map(|o| o.path)
        .collect()
}

#[test]
fn a_gap_in_a_set_is_an_error_naming_the_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let shards = three_shards(dir.path(), "m");
    std::fs::remove_file(&shards[1]).unwrap();
    let err = ShardSet::open(&shards[0]).unwrap_err();
    assert!(
        matches!(&err, Error::ShardMissing { path, index: 1, count: 3 } if *path == shards[1]),
        "{err}"
    );
}

#[test]
fn a_duplicated_shard_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let shards = three_shards(dir.path(), "m");
    std::fs::copy(&shards[0], &shards[1]).unwrap();
    let err = ShardSet::open(&shards[2]).unwrap_err();
    assert!(
        matches!(&err, Error::ShardNumberMismatch { path, expected: 1, found: 0 } if *path == shards[1]),
        "{err}"
    );
}

#[test]
fn a_shard_of_a_set_of_another_size_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let shards = three_shards(dir.path(), "m");
    // The same file split in two, its second shard renamed into the set of three.
    let source = dir.path().join("model.gguf");
    let other = split_into(
        &source,
        &dir.path().join("two"),
        &SplitOptions {
            limit: SplitLimit::Tensors(3),
            no_tensor_first_split: false,
        },
    );
    std::fs::copy(&other[1].path, &shards[1]).unwrap();
    let err = ShardSet::open(&shards[0]).unwrap_err();
    assert!(
        matches!(&err, Error::ShardCountMismatch { path, expected: 3, found: 2 } if *path == shards[1]),
        "{err}"
    );
}

#[test]
fn a_foreign_shard_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let shards = three_shards(dir.path(), "m");
    // A set of three from a file with one tensor less: its last shard claims 4 tensors.
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama");
    for t in 0..4u32 {
        w.add_tensor(TensorSpec::from_bytes(
            format!("t{t}"),
            vec![8],
            GgmlType::F32,
            vec![0u8; 32],
        ));
    }
    let small = dir.path().join("small.gguf");
    w.write_to_path(&small).unwrap();
    let foreign = split_into(
        &small,
        &dir.path().join("f"),
        &SplitOptions {
            limit: SplitLimit::Tensors(2),
            no_tensor_first_split: true,
        },
    );
    assert_eq!(foreign.len(), 3);
    std::fs::copy(&foreign[2].path, &shards[2]).unwrap();
    let err = ShardSet::open(&shards[0]).unwrap_err();
    assert!(
        matches!(&err, Error::ShardTensorCountMismatch { path, expected: 5, found: 4 } if *path == shards[2]),
        "{err}"
    );
}

#[test]
fn a_tensor_in_two_shards_is_an_error_naming_both() {
    let dir = tempfile::tempdir().unwrap();
    let shards = three_shards(dir.path(), "m");
    // A third shard holding t0 again (with the right split keys) instead of t4.
    let mut w = GgufWriter::new();
    w.set("split.no", Value::U16(2))
        .set("split.count", Value::U16(3))
        .set("split.tensors.count", Value::I32(5));
    w.add_tensor(TensorSpec::from_bytes(
        "t0",
        vec![8],
        GgmlType::F32,
        vec![0u8; 32],
    ));
    std::fs::remove_file(&shards[2]).unwrap();
    w.write_to_path(&shards[2]).unwrap();
    let err = ShardSet::open(&shards[0]).unwrap_err();
    assert!(
        matches!(&err, Error::DuplicateShardTensor { name, first, second }
            if name == "t0" && *first == shards[0] && *second == shards[2]),
        "{err}"
    );
}

#[test]
fn a_file_without_split_keys_or_a_shard_name_is_not_a_set() {
    let dir = tempfile::tempdir().unwrap();
    let source = five_tensors(dir.path());
    let err = ShardSet::open(&source).unwrap_err();
    assert!(matches!(err, Error::NotAShardName { .. }), "{err}");
    let named = dir.path().join("x-00001-of-00001.gguf");
    std::fs::copy(&source, &named).unwrap();
    let err = ShardSet::open(&named).unwrap_err();
    assert!(
        matches!(&err, Error::NotAShard { path, key: "split.no" } if *path == named),
        "{err}"
    );
}

/// The tensors of every shard of the set, and `split.tensors.count` as each shard says it.
fn set_contents(first: &Path) -> (Vec<Vec<String>>, Vec<u64>) {
    let set = ShardSet::open(first).unwrap();
    let parsed = set.parse_all().unwrap();
    (
        parsed
            .iter()
            .map(|g| g.tensors().iter().map(|t| t.name.clone()).collect())
            .collect(),
        parsed
            .iter()
            .map(|g| g.get(SPLIT_TENSORS_COUNT_KEY).unwrap().as_u64().unwrap())
            .collect(),
    )
}

#[test]
fn removing_a_tensor_from_a_set_in_place_updates_the_count_in_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let shards = three_shards(dir.path(), "m");
    let data_before = std::fs::read(&shards[0]).unwrap();
    let set = ShardSet::open(&shards[1]).unwrap();
    let parsed = set.parse_all().unwrap();
    let plan = SetRewritePlan::new(&set, &parsed, None, |_, writers| {
        let holder = writers
            .iter_mut()
            .find(|w| w.tensors().iter().any(|t| t.name == "t3"))
            .unwrap();
        crate::edit::remove_tensor(holder, "t3")
    })
    .unwrap();
    let report = serde_json::to_value(&plan).unwrap();
    assert_eq!(report["kind"], "set_rewrite");
    assert_eq!(report["files"][1]["tensors_removed"][0], "t3");
    assert_eq!(
        report["files"][0]["keys_changed"][0],
        SPLIT_TENSORS_COUNT_KEY
    );
    // Planning wrote nothing.
    assert_eq!(std::fs::read(&shards[0]).unwrap(), data_before);
    drop(parsed);
    let outcome = plan.apply().unwrap();
    drop(set);
    assert!(outcome.shards.iter().all(|s| s.rewritten));
    let (tensors, counts) = set_contents(&shards[2]);
    assert_eq!(tensors, vec![vec!["t0", "t1"], vec!["t2"], vec!["t4"]]);
    assert_eq!(counts, vec![4, 4, 4]);
    assert!(!set_rewrite_marker(&dir.path().join("m")).exists());
    // The tensor data of the shards untouched by the removal is what it was.
    let merged = dir.path().join("merged.gguf");
    merge(&ShardSet::open(&shards[0]).unwrap(), &merged).unwrap();
    let file = MappedFile::open(&merged).unwrap();
    let gguf = file.parse().unwrap();
    for (t, name) in [(0u32, "t0"), (4, "t4")] {
        let bytes = gguf.tensor_data(gguf.tensor(name).unwrap());
        let expected: Vec<u8> = (0..8 * (t + 1))
            .flat_map(|i| ((t * 100 + i) as f32).to_le_bytes())
            .collect();
        assert_eq!(bytes, &expected[..], "{name}");
    }
}

#[test]
fn a_set_rewritten_into_a_new_prefix_leaves_the_old_set_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let shards = three_shards(dir.path(), "m");
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    let set = ShardSet::open(&shards[0]).unwrap();
    let parsed = set.parse_all().unwrap();
    let out = dir.path().join("renamed.gguf");
    let plan = SetRewritePlan::new(&set, &parsed, Some(&out), |_, writers| {
        crate::edit::rename_tensor(&mut writers[0], "t0", "first")
    })
    .unwrap();
    let outcome = plan.apply().unwrap();
    let after: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    assert_eq!(before, after);
    let first = dir.path().join("renamed-00001-of-00003.gguf");
    assert_eq!(outcome.shards[0].output, first);
    let (tensors, counts) = set_contents(&first);
    assert_eq!(tensors[0], vec!["first", "t1"]);
    assert_eq!(counts, vec![5, 5, 5]);
    // The unchanged shards are copied byte for byte.
    assert_eq!(
        std::fs::read(dir.path().join("renamed-00003-of-00003.gguf")).unwrap(),
        before[2]
    );
}

#[test]
fn an_interrupted_set_rewrite_is_refused_until_it_is_finished() {
    let dir = tempfile::tempdir().unwrap();
    let shards = three_shards(dir.path(), "m");
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let other = three_shards(&other_dir, "m");
    // A crash after the marker: shard 1 renamed already, shards 2 and 3 still temporary.
    std::fs::copy(&other[1], dir.path().join(".hotpatch-a.gguf.tmp")).unwrap();
    std::fs::copy(&other[2], dir.path().join(".hotpatch-b.gguf.tmp")).unwrap();
    let marker = set_rewrite_marker(&dir.path().join("m"));
    std::fs::write(
        &marker,
        r#"{"renames": [[".hotpatch-gone.gguf.tmp", "m-00001-of-00003.gguf"],
            [".hotpatch-a.gguf.tmp", "m-00002-of-00003.gguf"],
            [".hotpatch-b.gguf.tmp", "m-00003-of-00003.gguf"]]}"#,
    )
    .unwrap();
    let err = ShardSet::open(&shards[2]).unwrap_err();
    assert!(
        matches!(&err, Error::InterruptedSetRewrite { marker: m } if *m == marker),
        "{err}"
    );
    use std::os::unix::fs::MetadataExt;
    let temp_inode = std::fs::metadata(dir.path().join(".hotpatch-a.gguf.tmp"))
        .unwrap()
        .ino();
    let recovery = interrupted_set_rewrite(&shards[0]).unwrap().unwrap();
    assert_eq!(recovery.renames.len(), 2);
    finish_set_rewrite(&recovery).unwrap();
    assert!(!marker.exists());
    ShardSet::open(&shards[0]).unwrap();
    // The temporary file became the shard.
    assert_eq!(std::fs::metadata(&shards[1]).unwrap().ino(), temp_inode);
    assert!(!dir.path().join(".hotpatch-b.gguf.tmp").exists());
    assert!(interrupted_set_rewrite(&shards[0]).unwrap().is_none());
    // A marker naming paths outside its directory is refused, not followed.
    std::fs::write(
        &marker,
        r#"{"renames": [["../x", "m-00001-of-00003.gguf"]]}"#,
    )
    .unwrap();
    assert!(matches!(
        interrupted_set_rewrite(&shards[0]).unwrap_err(),
        Error::CorruptSetRewriteMarker { .. }
    ));
    std::fs::write(&marker, b"{").unwrap();
    assert!(matches!(
        interrupted_set_rewrite(&shards[0]).unwrap_err(),
        Error::CorruptSetRewriteMarker { .. }
    ));
}

#[test]
fn output_prefixes_follow_the_name_given() {
    assert_eq!(
        output_prefix(Path::new("d/new.gguf"), 3),
        Path::new("d/new")
    );
    assert_eq!(output_prefix(Path::new("d/new"), 3), Path::new("d/new"));
    assert_eq!(
        output_prefix(Path::new("d/new-00001-of-00003.gguf"), 3),
        Path::new("d/new")
    );
    // A shard name of another count is a plain name.
    assert_eq!(
        output_prefix(Path::new("d/new-00001-of-00002.gguf"), 3),
        Path::new("d/new-00001-of-00002")
    );
}

/// The data offset of tensor `name` in `shard`, and its bytes.
fn tensor_bytes(shard: &Path, name: &str) -> (u64, Vec<u8>) {
    let file = MappedFile::open(shard).unwrap();
    let gguf = file.parse().unwrap();
    let t = gguf.require_tensor(name).unwrap();
    (t.data_range().start, gguf.tensor_data(t).to_vec())
}

/// New bytes for tensor `name` of `shard`: every f32 negated.
fn negated(shard: &Path, name: &str) -> ShardWrites {
    let (offset, bytes) = tensor_bytes(shard, name);
    let bytes = bytes
        .chunks(4)
        .flat_map(|c| (-f32::from_le_bytes(c.try_into().unwrap())).to_le_bytes())
        .collect();
    ShardWrites {
        shard: shard.to_owned(),
        writes: vec![crate::patcher::ByteWrite { offset, bytes }],
        reverts: None,
    }
}

#[test]
fn a_set_transaction_writes_every_shard_and_reverts_as_one() {
    use transaction::*;
    let dir = tempfile::tempdir().unwrap();
    let shards = three_shards(dir.path(), "tx");
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    let parts = vec![negated(&shards[2], "t4"), negated(&shards[0], "t1")];
    let receipt = run_set_transaction(&shards[1], "negate t1 and t4", None, parts).unwrap();
    let id = receipt.transaction.unwrap();
    assert_eq!(receipt.parts.len(), 2);
    assert_eq!(receipt.parts[0].shard, shards[0]);
    assert_eq!(receipt.bytes(), 4 * (16 + 40));
    assert_eq!(std::fs::read(&shards[1]).unwrap(), before[1]);
    assert_eq!(
        tensor_bytes(&shards[2], "t4").1[..4],
        (-400f32).to_le_bytes()
    );
    // One decision in the set's journal; a part in each shard, naming it.
    let prefix = dir.path().join("tx");
    let set = crate::Journal::open_read_only(&set_journal_target(&prefix)).unwrap();
    assert!(matches!(
        set.transaction(id).unwrap().state,
        crate::TransactionState::Committed(_)
    ));
    let parts = set_parts(&shards[0], id).unwrap();
    assert_eq!(parts.len(), 2);
    // A part alone is not reverted by its shard: the set is.
    let shard_journal = crate::Journal::open_read_only(&shards[2]).unwrap();
    let part = shard_journal.transaction(parts[1].1).unwrap();
    assert_eq!(part_of(&shards[2], part).unwrap().1, id);
    let file = MappedFile::open(&shards[2]).unwrap();
    assert!(matches!(
        crate::inplace::revert_writes(&shard_journal, file.bytes(), part.id),
        Err(Error::NotedTransaction(_))
    ));
    let reverted = revert_set_transaction(&shards[2], id).unwrap();
    assert_eq!(reverted.parts.len(), 2);
    for (shard, original) in shards.iter().zip(&before) {
        assert_eq!(&std::fs::read(shard).unwrap(), original);
    }
    assert!(matches!(
        revert_set_transaction(&shards[0], id),
        Err(Error::AlreadyReverted(_))
    ));
    // Writes that change nothing make no transaction.
    let same = tensor_bytes(&shards[1], "t2");
    let noop = ShardWrites {
        shard: shards[1].clone(),
        writes: vec![crate::patcher::ByteWrite {
            offset: same.0,
            bytes: same.1,
        }],
        reverts: None,
    };
    let receipt = run_set_transaction(&shards[0], "nothing", None, vec![noop]).unwrap();
    assert_eq!(receipt.transaction, None);
}

/// Stops a set transaction as a crash would, after its shards' bytes are written and,
/// when `decided`, after the set's journal recorded the commit: journals and files are
/// dropped with the parts unfinished.
fn crash_mid_set_transaction(shards: &[PathBuf], decided: bool) {
    use crate::inplace::InPlaceFile;
    let prefix = parse_shard_name(&shards[0]).unwrap().prefix;
    let target = transaction::set_journal_target(&prefix);
    let mut set = crate::Journal::open(&target).unwrap();
    let id = set.begin_with_note("crash", None, &[], b"{}").unwrap();
    let note = serde_json::json!({"format": "hotpatch-set-part/1",
        "set": target.file_name().unwrap().to_str().unwrap(), "transaction": id});
    let note = note.to_string();
    let mut open = Vec::new();
    for (shard, name) in [(&shards[0], "t1"), (&shards[2], "t4")] {
        let mut file = InPlaceFile::open(shard).unwrap();
        let writes = file.changed_writes(negated(shard, name).writes).unwrap();
        let prepared = file
            .prepare("crash", None, writes, note.as_bytes())
            .unwrap();
        file.write_prepared(&prepared).unwrap();
        open.push((file, prepared));
    }
    if decided {
        set.commit(id).unwrap();
    }
}

#[test]
fn a_set_transaction_cut_after_its_decision_is_completed_in_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let shards = three_shards(dir.path(), "done");
    let before = tensor_bytes(&shards[2], "t4").1;
    crash_mid_set_transaction(&shards, true);
    // The last shard alone first: its part is completed, not rolled back.
    let report = crate::inplace::recover(&shards[2]).unwrap().unwrap();
    assert!(report.completed);
    assert_ne!(tensor_bytes(&shards[2], "t4").1, before);
    let reports = transaction::recover_set(&shards[1]).unwrap();
    assert_eq!(reports.len(), 1);
    assert!(reports[0].1.completed);
    assert_eq!(reports[0].0, shards[0]);
    assert_eq!(
        tensor_bytes(&shards[0], "t1").1[..4],
        (-100f32).to_le_bytes()
    );
}

#[test]
fn a_set_transaction_cut_before_its_decision_is_rolled_back_in_every_shard() {
    let dir = tempfile::tempdir().unwrap();
    let shards = three_shards(dir.path(), "undone");
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    crash_mid_set_transaction(&shards, false);
    assert_ne!(std::fs::read(&shards[2]).unwrap(), before[2]);
    let plan = crate::plan::RecoveryPlan::new(&shards[2]).unwrap();
    assert!(plan.rolls_back().is_some() && plan.completes().is_none());
    let reports = transaction::recover_set(&shards[0]).unwrap();
    assert_eq!(reports.len(), 2);
    assert!(reports.iter().all(|(_, r)| !r.completed));
    for (shard, original) in shards.iter().zip(&before) {
        assert_eq!(&std::fs::read(shard).unwrap(), original);
    }
    // The undecided set transaction is closed, so the next one can begin.
    let parts = vec![negated(&shards[2], "t4")];
    let receipt = transaction::run_set_transaction(&shards[0], "again", None, parts).unwrap();
    assert_eq!(receipt.transaction, Some(2));
}
