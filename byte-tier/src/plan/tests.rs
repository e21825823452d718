use std::time::{Duration, SystemTime};

use super::*;
use crate::file::MappedFile;
use crate::patcher::BytePatcher;
use crate::types::GgmlType;
use crate::writer::TensorSpec;

fn model() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", "toy")
        .set("general.name", "abcd")
        .set("toy.block_count", 2u32);
    for b in 0..2u8 {
        w.add_tensor(TensorSpec::from_bytes(
            format!("blk.{b}.w"),
            vec![4],
            GgmlType::F32,
            vec![b; 16],
        ));
    }
    let mut out = Vec::new();
    w.write_to(&mut out).unwrap();
    out
}

fn two_copies() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.gguf"), dir.path().join("b.gguf"));
    std::fs::write(&a, model()).unwrap();
    std::fs::write(&b, model()).unwrap();
    (dir, a, b)
}

fn tensor_offset(path: &Path, name: &str) -> u64 {
    let map = MappedFile::open(path).unwrap();
    map.parse()
        .unwrap()
        .require_tensor(name)
        .unwrap()
        .data_offset
}

fn writes(at: u64) -> Vec<ByteWrite> {
    vec![
        ByteWrite {
            offset: at + 4,
            bytes: vec![0xab; 4],
        },
        ByteWrite {
            offset: at,
            bytes: vec![0xcd; 2],
        },
    ]
}

fn stat(path: &Path) -> (Vec<u8>, SystemTime) {
    let modified = std::fs::metadata(path).unwrap().modified().unwrap();
    (std::fs::read(path).unwrap(), modified)
}

fn in_place_plan(path: &Path) -> WritePlan {
    let at = tensor_offset(path, "blk.1.w");
    let map = MappedFile::open(path).unwrap();
    WritePlan::new(path, map.bytes(), "test", writes(at), NoDetails {}).unwrap()
}

#[test]
fn an_applied_write_plan_equals_the_direct_write_byte_for_byte() {
    let (_dir, planned, direct) = two_copies();
    let plan = in_place_plan(&planned);
    let json = serde_json::to_value(&plan).unwrap();
    assert_eq!(json["kind"], "in_place");
    assert_eq!(json["bytes"], 6);
    assert_eq!(json["writes"][0]["tensor"], "blk.1.w");
    assert_eq!(json["writes"].as_array().unwrap().len(), 2);
    let receipt = plan.apply().unwrap();
    assert_eq!(receipt.transaction, Some(1));

    let at = tensor_offset(&direct, "blk.1.w");
    let mut file = InPlaceFile::open(&direct).unwrap();
    file.commit("test", writes(at)).unwrap();
    drop(file);
    assert_eq!(
        std::fs::read(&planned).unwrap(),
        std::fs::read(&direct).unwrap()
    );
}

#[test]
fn a_write_plan_names_the_metadata_key_it_changes() {
    let (_dir, path, _) = two_copies();
    let map = MappedFile::open(&path).unwrap();
    let gguf = map.parse().unwrap();
    let write = crate::edit::in_place_metadata_write(&gguf, "general.name", &"wxyz".into())
        .unwrap()
        .unwrap();
    let plan = WritePlan::new(&path, map.bytes(), "meta", vec![write], NoDetails {}).unwrap();
    let json = serde_json::to_value(&plan).unwrap();
    assert_eq!(json["writes"][0]["key"], "general.name");
    assert_eq!(json["writes"][0]["tensor"], serde_json::Value::Null);
}

#[test]
fn an_applied_rewrite_plan_equals_the_direct_rewrite_byte_for_byte() {
    let (dir, input, _) = two_copies();
    let (planned, direct) = (dir.path().join("p.gguf"), dir.path().join("d.gguf"));
    let map = MappedFile::open(&input).unwrap();
    let gguf = map.parse().unwrap();
    let plan = RewritePlan::new(&input, Some(&planned), &gguf, |_, w| {
        w.set("general.name", "a longer name");
        crate::edit::remove_tensor(w, "blk.0.w")
    })
    .unwrap();
    let json = serde_json::to_value(&plan).unwrap();
    assert_eq!(json["kind"], "rewrite");
    assert_eq!(json["keys_changed"], serde_json::json!(["general.name"]));
    assert_eq!(json["tensors_removed"], serde_json::json!(["blk.0.w"]));
    let size_after = plan.size_after();
    let outcome = plan.apply().unwrap();
    assert_eq!(outcome.bytes_written, size_after);

    let mut writer = GgufWriter::from_gguf(&gguf);
    writer.set("general.name", "a longer name");
    crate::edit::remove_tensor(&mut writer, "blk.0.w").unwrap();
    writer.write_to_path(&direct).unwrap();
    assert_eq!(
        std::fs::read(&planned).unwrap(),
        std::fs::read(&direct).unwrap()
    );
}

#[test]
fn planning_writes_nothing_and_creates_no_journal() {
    let (dir, path, _) = two_copies();
    let before = stat(&path);
    let plan = in_place_plan(&path);
    assert!(!plan.is_noop());
    drop(plan);
    {
        let map = MappedFile::open(&path).unwrap();
        let gguf = map.parse().unwrap();
        let plan = RewritePlan::new(&path, None, &gguf, |_, w| {
            w.set("general.name", "a longer name");
            Ok(())
        })
        .unwrap();
        assert!(!plan.is_noop());
    }
    assert!(matches!(
        WritePlan::revert(&path, 1),
        Err(Error::NoSuchTransaction(1))
    ));
    assert_eq!(stat(&path), before);
    assert!(!journal_path(&path).exists());
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn a_revert_plan_restores_what_the_transaction_replaced() {
    let (_dir, path, _) = two_copies();
    let original = std::fs::read(&path).unwrap();
    in_place_plan(&path).apply().unwrap();
    let before = stat(&path);
    let plan = WritePlan::revert(&path, 1).unwrap();
    assert_eq!(plan.reverts, Some(1));
    assert_eq!(plan.bytes, 6);
    assert_eq!(stat(&path), before, "planning a revert wrote");
    let receipt = plan.apply().unwrap();
    assert_eq!(receipt.transaction, Some(2));
    assert_eq!(std::fs::read(&path).unwrap(), original);
    assert!(matches!(
        WritePlan::revert(&path, 1),
        Err(Error::AlreadyReverted(1))
    ));
}

#[test]
fn a_file_changed_in_the_planned_bytes_is_refused_as_stale() {
    let (_dir, path, _) = two_copies();
    let plan = in_place_plan(&path);
    let at = plan.byte_writes()[0].offset;
    let mut file = InPlaceFile::open(&path).unwrap();
    file.fill(at..at + 1, 0x11).unwrap();
    drop(file);
    let changed = std::fs::read(&path).unwrap();
    assert!(matches!(plan.apply(), Err(Error::StalePlan { .. })));
    assert_eq!(std::fs::read(&path).unwrap(), changed);
}

#[test]
fn a_file_modified_elsewhere_is_refused_as_stale() {
    let (_dir, path, _) = two_copies();
    let plan = in_place_plan(&path);
    // A byte outside the planned writes, and a new modification time.
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    drop(file);
    assert!(matches!(plan.apply(), Err(Error::StalePlan { .. })));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);

    let map = MappedFile::open(&path).unwrap();
    let gguf = map.parse().unwrap();
    let rewrite = RewritePlan::new(&path, None, &gguf, |_, w| {
        w.set("general.name", "a longer name");
        Ok(())
    })
    .unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .unwrap()
        .set_len(bytes.len() as u64 + 1)
        .unwrap();
    assert!(matches!(rewrite.write(), Err(Error::StalePlan { .. })));
}

#[test]
fn a_recovery_plan_names_the_unfinished_transaction_and_applies_its_rollback() {
    let (_dir, path, _) = two_copies();
    let original = std::fs::read(&path).unwrap();
    let nothing = RecoveryPlan::new(&path).unwrap();
    assert!(nothing.is_noop());
    assert!(!journal_path(&path).exists(), "planning created a journal");

    // A crash after the undo record and the first write: an unfinished transaction.
    let at = tensor_offset(&path, "blk.0.w");
    let new = [0x5au8; 4];
    let mut journal = Journal::open(&path).unwrap();
    let id = journal
        .begin(
            "torn",
            None,
            &[(at, &original[at as usize..at as usize + 4], &new)],
        )
        .unwrap();
    drop(journal);
    let mut torn = original.clone();
    torn[at as usize..at as usize + 4].copy_from_slice(&new);
    std::fs::write(&path, &torn).unwrap();

    let before = stat(&path);
    let plan = RecoveryPlan::new(&path).unwrap();
    assert_eq!(plan.rolls_back(), Some(id));
    let json = serde_json::to_value(&plan).unwrap();
    assert_eq!(json["rolls_back"], id);
    assert_eq!(json["writes"][0]["tensor"], "blk.0.w");
    assert_eq!(stat(&path), before, "planning a recovery wrote");
    let report = plan.apply().unwrap().unwrap();
    assert_eq!(report.transaction, id);
    assert_eq!(std::fs::read(&path).unwrap(), original);
}

#[test]
fn a_journal_left_empty_by_a_writer_stopped_at_its_creation_has_nothing_to_recover() {
    let (_dir, path, _) = two_copies();
    std::fs::write(journal_path(&path), b"").unwrap();
    let plan = RecoveryPlan::new(&path).unwrap();
    assert!(plan.is_noop());
    assert_eq!(plan.apply().unwrap(), None);
    assert!(matches!(
        WritePlan::revert(&path, 1),
        Err(Error::NoSuchTransaction(1))
    ));
}

#[test]
fn a_streamed_file_is_written_as_planned_or_not_at_all() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.bin");
    let content: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let writer = |bytes: Vec<u8>| -> ContentWriter {
        Box::new(move |out| {
            for chunk in bytes.chunks(4096) {
                out.write_all(chunk)
                    .map_err(|e| Error::io("write", "out.bin", e))?;
            }
            Ok(())
        })
    };
    // The plan has the length but no digest; the applied file has both, and the digest
    // is the content's.
    let plan = NewFilesPlan::streamed(
        None,
        path.clone(),
        content.len() as u64,
        writer(content.clone()),
        NoDetails {},
    )
    .unwrap();
    let json = serde_json::to_value(&plan).unwrap();
    assert_eq!(json["files"][0]["sha256"], serde_json::Value::Null);
    assert!(!path.exists(), "planning wrote the file");
    let written = plan.apply().unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), content);
    assert_eq!(
        written[0].sha256.as_deref(),
        Some(to_hex(&Sha256::digest(&content)).as_str())
    );
    // A writer that writes another length than planned replaces nothing and leaves no
    // temporary file.
    let other = path.with_extension("other");
    let plan = NewFilesPlan::streamed(
        None,
        other.clone(),
        content.len() as u64 + 1,
        writer(content.clone()),
        NoDetails {},
    )
    .unwrap();
    assert!(matches!(
        plan.apply(),
        Err(Error::LengthMismatch { found: 100_000, .. })
    ));
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("out.bin")]);
}
