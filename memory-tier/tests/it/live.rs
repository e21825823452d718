//! LiveModel: protection, conflicts, transactions, readers, shared files.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use byte_tier::{GgmlType, GgufWriter, MappedFile, TensorSpec};
use memory_tier::{
    Action, AttachMode, Error, Event, LiveModel, MemoryPatch, PatchTarget, Payload, ValueTransform,
    WindowPolicy,
};

/// A small model: an F32 tensor of 64 KiB, a Q8_0 tensor and another F32 one.
fn small_model(dir: &Path) -> PathBuf {
    let path = dir.join("m.gguf");
    let mut w = GgufWriter::new();
    w.set("general.architecture", "toy");
    let f32s: Vec<u8> = (0..16384u32)
        .flat_map(|i| (i as f32 * 0.001).to_le_bytes())
        .collect();
    w.add_tensor(TensorSpec::from_bytes(
        "a",
        vec![16384],
        GgmlType::F32,
        f32s,
    ));
    let q: Vec<f32> = (0..4096).map(|i| ((i % 97) as f32 - 48.0) * 0.01).collect();
    let q8 = byte_tier::codec::quantize(GgmlType::Q8_0, &q).unwrap();
    w.add_tensor(TensorSpec::from_bytes("q", vec![4096], GgmlType::Q8_0, q8));
    w.add_tensor(TensorSpec::from_bytes(
        "b",
        vec![1024],
        GgmlType::F32,
        vec![0u8; 4096],
    ));
    w.write_to_path(&path).unwrap();
    path
}

fn raw(name: &str, range: std::ops::Range<u64>, byte: u8) -> MemoryPatch {
    let len = (range.end - range.start) as usize;
    MemoryPatch::new(
        name,
        PatchTarget::Raw(range),
        Payload::Bytes(vec![byte; len]),
    )
}

const CHILD: &str = "HOTPATCH_STRAY_WRITE_CHILD";

#[test]
fn a_stray_write_faults_and_a_write_in_a_window_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_model(dir.path());
    if std::env::var_os(CHILD).is_some() {
        let model = LiveModel::attach(&path, AttachMode::Owned).unwrap();
        let start = model.tensor("a").unwrap().data_offset as usize;
        let target = model.read().bytes()[start..].as_ptr() as *mut u8;
        // SAFETY: none: this write is the bug the page protection exists to catch; the
        // parent expects this process to die of SIGSEGV here.
        unsafe { target.write_volatile(0x55) };
        std::process::exit(0);
    }
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "live::a_stray_write_faults_and_a_write_in_a_window_succeeds",
            "--nocapture",
        ])
        .env(CHILD, "1")
        .status()
        .unwrap();
    assert!(
        matches!(status.signal(), Some(11) | Some(7)),
        "the stray write did not fault: {status:?}"
    );

    // The same write, as a patch, goes through its window; the pages are read-only again after.
    let model = LiveModel::attach(&path, AttachMode::Owned).unwrap();
    let start = model.tensor("a").unwrap().data_offset;
    model
        .apply(raw("one byte", start..start + 1, 0x55))
        .unwrap();
    assert_eq!(model.read().bytes()[start as usize], 0x55);
    let stats = model.stats();
    assert_eq!(stats.windows_opened, 1);
    assert_eq!(stats.protection_calls, 3, "attach, open, close");
}

#[test]
fn patches_stay_inside_their_tensor_and_region() {
    let dir = tempfile::tempdir().unwrap();
    let model = LiveModel::attach(small_model(dir.path()), AttachMode::Private).unwrap();
    let a = model.tensor("a").unwrap().clone();
    let before = model.read().bytes().to_vec();
    let end = a.data_range().end;
    for (patch, check) in [
        (raw("bleed", end - 2..end + 2, 1), "leaves tensor"),
        (
            raw("past the end", model.len() - 1..model.len() + 1, 1),
            "outside the region",
        ),
        (
            MemoryPatch::new(
                "misaligned",
                PatchTarget::Tensor {
                    name: "q".into(),
                    elements: Some(0..33),
                },
                Payload::Transform(ValueTransform::Zero),
            ),
            "not aligned",
        ),
        (
            MemoryPatch::transform("unknown", "nope", ValueTransform::Zero),
            "no tensor",
        ),
        (
            MemoryPatch::new(
                "short",
                PatchTarget::Tensor {
                    name: "b".into(),
                    elements: None,
                },
                Payload::Bytes(vec![1; 10]),
            ),
            "10 bytes",
        ),
    ] {
        let error = model.apply(patch).unwrap_err();
        let mut text = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        assert!(text.contains(check), "{text}");
    }
    assert_eq!(model.read().bytes(), &before[..]);
    assert_eq!(model.stats().windows_opened, 0);
}

#[test]
fn conflicts_are_settled_by_priority() {
    let dir = tempfile::tempdir().unwrap();
    let model = LiveModel::attach(small_model(dir.path()), AttachMode::Owned).unwrap();
    let s = model.tensor("a").unwrap().data_offset;
    let low = raw("low", s..s + 64, 1).with_priority(1);
    let low_id = model.apply(low).unwrap();
    let equal = raw("equal", s + 32..s + 96, 2).with_priority(1);
    let report = model.check_conflicts(&equal).unwrap();
    assert_eq!(report.len(), 1);
    assert_eq!(report[0].applied, low_id);
    assert_eq!(report[0].overlap, s + 32..s + 64);
    assert!(!report[0].new_patch_wins);
    assert!(matches!(model.apply(equal), Err(Error::Conflict { .. })));
    let high = raw("high", s + 32..s + 96, 3).with_priority(5);
    let high_id = model.apply(high).unwrap();
    let bytes = model.read().bytes()[s as usize..s as usize + 96].to_vec();
    // The higher patch lies over the lower one, which stays applied where it is not
    // covered.
    assert!(bytes[..32].iter().all(|&b| b == 1));
    assert!(bytes[32..].iter().all(|&b| b == 3));
    assert_eq!(model.applied().len(), 2);
    let covered = model.applied_patches();
    assert_eq!(covered[0].covered_by, vec![high_id]);
    assert!(covered[1].covered_by.is_empty());
}

/// The bytes of tensor `a` from its start, `len` of them.
fn a_bytes(model: &LiveModel, len: usize) -> Vec<u8> {
    let s = model.tensor("a").unwrap().data_offset as usize;
    model.read().bytes()[s..s + len].to_vec()
}

#[test]
fn reverting_a_patch_that_displaced_another_brings_the_displaced_one_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_model(dir.path());
    let original = std::fs::read(&path).unwrap();
    let model = LiveModel::attach(&path, AttachMode::Shared).unwrap();
    let events = model.subscribe();
    let s = model.tensor("a").unwrap().data_offset;
    let before = a_bytes(&model, 96);
    let a = model
        .apply(raw("A", s..s + 64, 1).with_priority(1))
        .unwrap();
    let b = model
        .apply(raw("B", s + 32..s + 96, 3).with_priority(5))
        .unwrap();
    model.revert(b).unwrap();
    // A's bytes are back, and A is still applied: it can be reverted by its id.
    let bytes = a_bytes(&model, 96);
    assert!(bytes[..64].iter().all(|&x| x == 1), "{bytes:?}");
    assert_eq!(&bytes[64..], &before[64..]);
    assert_eq!(model.applied(), vec![(a, "A".to_owned())]);
    let seen: Vec<Event> = events.try_iter().collect();
    assert!(
        seen.contains(&Event::Displaced { id: a, by: b }),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|e| matches!(e, Event::Restored { id, by, .. } if *id == a && *by == b)),
        "{seen:?}"
    );
    let history = model.history();
    assert!(
        history
            .iter()
            .any(|h| h.id == a && h.action == Action::Restored)
    );
    model.revert(a).unwrap();
    drop(model);
    assert_eq!(std::fs::read(&path).unwrap(), original);
}

#[test]
fn reverting_a_covered_patch_changes_only_its_uncovered_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_model(dir.path());
    let original = std::fs::read(&path).unwrap();
    let model = LiveModel::attach(&path, AttachMode::Shared).unwrap();
    let s = model.tensor("a").unwrap().data_offset;
    let before = a_bytes(&model, 96);
    let a = model
        .apply(raw("A", s..s + 64, 1).with_priority(1))
        .unwrap();
    let b = model
        .apply(raw("B", s + 32..s + 96, 3).with_priority(5))
        .unwrap();
    model.revert(a).unwrap();
    let bytes = a_bytes(&model, 96);
    assert_eq!(&bytes[..32], &before[..32]);
    assert!(bytes[32..].iter().all(|&x| x == 3));
    // Reverting B now restores the original bytes, not A's.
    model.revert(b).unwrap();
    assert_eq!(a_bytes(&model, 96), before);
    drop(model);
    assert_eq!(std::fs::read(&path).unwrap(), original);
}

#[test]
fn a_displacing_transform_starts_from_the_values_under_the_displaced_patch() {
    let dir = tempfile::tempdir().unwrap();
    let model = LiveModel::attach(small_model(dir.path()), AttachMode::Owned).unwrap();
    let q = model.tensor("q").unwrap().data_range();
    let before = model.read().bytes()[q.start as usize..q.end as usize].to_vec();
    let low = MemoryPatch::transform("double", "q", ValueTransform::Scale(2.0)).with_priority(1);
    model.apply(low).unwrap();
    let high = MemoryPatch::transform("half", "q", ValueTransform::Scale(0.5)).with_priority(2);
    let high_id = model.apply(high).unwrap();
    // "half" replaces "double": the tensor holds half the original values, not the
    // original ones.
    let halved = {
        let mut bytes = before.clone();
        byte_tier::codec::transform_range(
            model.tensor("q").unwrap().ggml_type,
            &mut bytes,
            0..model.tensor("q").unwrap().n_elements,
            &byte_tier::codec::Transform::Scale(0.5),
        )
        .unwrap();
        bytes
    };
    assert_eq!(
        &model.read().bytes()[q.start as usize..q.end as usize],
        &halved[..]
    );
    model.revert(high_id).unwrap();
    model.revert_all().unwrap();
    assert_eq!(
        &model.read().bytes()[q.start as usize..q.end as usize],
        &before[..]
    );
}

#[test]
fn patches_applied_before_a_restart_are_listed_again_and_revert_by_id() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_model(dir.path());
    let original = std::fs::read(&path).unwrap();
    let s;
    let (a, b, expiry);
    {
        let model = LiveModel::attach(&path, AttachMode::Shared).unwrap();
        s = model.tensor("a").unwrap().data_offset;
        expiry = std::time::UNIX_EPOCH + std::time::Duration::from_secs(4_000_000_000);
        a = model
            .apply(
                MemoryPatch::transform("scale q", "q", ValueTransform::Scale(0.5))
                    .with_priority(1)
                    .with_expiry(expiry),
            )
            .unwrap();
        let low = model
            .apply(raw("low", s..s + 64, 1).with_priority(1))
            .unwrap();
        b = model
            .apply(raw("high", s + 32..s + 96, 3).with_priority(7))
            .unwrap();
        // Reverting the covered patch hands its originals to the one over it; the
        // journal must remember that too.
        model.revert(low).unwrap();
        // Dropped without reverting, as a killed process would leave it.
    }
    let model = LiveModel::attach(&path, AttachMode::Shared).unwrap();
    let listed = model.applied_patches();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert_eq!(listed[0].patch.id, a);
    assert_eq!(listed[0].patch.name, "scale q");
    assert_eq!(listed[0].patch.priority, 1);
    assert_eq!(listed[0].patch.expires_at, Some(expiry));
    assert_eq!(
        listed[0].patch.payload,
        Payload::Transform(ValueTransform::Scale(0.5))
    );
    assert_eq!(listed[1].patch.id, b);
    assert_eq!(listed[1].patch.priority, 7);
    // A patch of lower priority over the listed one is still refused.
    assert!(matches!(
        model.apply(raw("lower", s + 40..s + 48, 9).with_priority(3)),
        Err(Error::Conflict { .. })
    ));
    model.revert(b).unwrap();
    model.revert(a).unwrap();
    drop(model);
    assert_eq!(std::fs::read(&path).unwrap(), original);
}

#[test]
fn conflict_checks_run_against_a_writer_thread_without_tearing() {
    let dir = tempfile::tempdir().unwrap();
    let model = LiveModel::attach(small_model(dir.path()), AttachMode::Owned).unwrap();
    let s = model.tensor("a").unwrap().data_offset;
    let probe = MemoryPatch::transform("probe", "q", ValueTransform::Scale(3.0)).with_priority(9);
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in 0..200u32 {
                let id = model
                    .apply(raw(&format!("w{i}"), s..s + 64, (i % 250) as u8 + 1))
                    .unwrap();
                let scale =
                    MemoryPatch::transform(format!("q{i}"), "q", ValueTransform::Scale(0.5));
                let q = model.apply(scale).unwrap();
                model.revert(q).unwrap();
                model.revert(id).unwrap();
            }
        });
        for _ in 0..400 {
            // Planning reads the tensor's bytes; it must never see a half-written one.
            let report = model.check_conflicts(&probe).unwrap();
            assert!(report.len() <= 1);
            assert!(report.iter().all(|c| c.new_patch_wins));
            let planned = model.plan(std::slice::from_ref(&probe)).unwrap();
            assert_eq!(planned.len(), 1);
        }
    });
    assert!(model.applied().is_empty());
}

#[test]
fn a_transaction_whose_third_patch_fails_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = LiveModel::attach(small_model(dir.path()), AttachMode::Owned).unwrap();
    let before = model.read().bytes().to_vec();
    let s = model.tensor("a").unwrap().data_offset;
    let result = model.apply_all(vec![
        raw("first", s..s + 16, 7),
        MemoryPatch::transform("second", "q", ValueTransform::Scale(0.5)),
        MemoryPatch::new(
            "third",
            PatchTarget::Tensor {
                name: "q".into(),
                elements: Some(0..31),
            },
            Payload::Transform(ValueTransform::Zero),
        ),
    ]);
    assert!(matches!(result, Err(Error::RolledBack { ref failed, .. }) if failed == "third"));
    assert_eq!(model.read().bytes(), &before[..]);
    assert!(model.applied().is_empty());

    // The same transaction without the bad patch applies whole and reverts exactly.
    let ids = model
        .apply_all(vec![
            raw("first", s..s + 16, 7),
            MemoryPatch::transform("second", "q", ValueTransform::Scale(0.5)),
        ])
        .unwrap();
    assert_eq!(ids.len(), 2);
    assert_ne!(model.read().bytes(), &before[..]);
    model.revert_all().unwrap();
    assert_eq!(model.read().bytes(), &before[..]);
    let stats = model.stats();
    assert_eq!(
        (
            stats.patches_applied,
            stats.patches_reverted,
            stats.applied_now
        ),
        (2, 2, 0)
    );
}

#[test]
fn undo_storage_keeps_the_smaller_of_original_and_delta() {
    let dir = tempfile::tempdir().unwrap();
    let model = LiveModel::attach(small_model(dir.path()), AttachMode::Owned).unwrap();
    // Scaling Q8_0 touches 2 bytes of every 34, merged into one run: about the size of
    // the range, never more; changing one value of a 64 KiB tensor keeps a delta of one
    // 4-byte run (plus its 16-byte offset and length).
    model
        .apply(MemoryPatch::transform(
            "scale q",
            "q",
            ValueTransform::Scale(2.0),
        ))
        .unwrap();
    let q_held = model.stats().undo_bytes_held;
    assert!(q_held <= model.tensor("q").unwrap().n_bytes, "{q_held}");
    let mut values: Vec<f32> = (0..16384).map(|i| i as f32 * 0.001).collect();
    values[100] = 0.0;
    model
        .apply(MemoryPatch::new(
            "one value",
            PatchTarget::Tensor {
                name: "a".into(),
                elements: None,
            },
            Payload::Transform(ValueTransform::Set(values)),
        ))
        .unwrap();
    assert_eq!(model.stats().undo_bytes_held, q_held + 16 + 4);
}

#[test]
fn readers_never_see_a_half_applied_patch() {
    let dir = tempfile::tempdir().unwrap();
    let model = Arc::new(LiveModel::attach(small_model(dir.path()), AttachMode::Owned).unwrap());
    let a = model.tensor("b").unwrap().clone();
    let original = crc32fast::hash(model.read().tensor_data("b").unwrap());
    let patched_bytes = vec![0xa5u8; a.n_bytes as usize];
    let patched = crc32fast::hash(&patched_bytes);
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, torn) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (model, stop, seen, torn) =
                (model.clone(), stop.clone(), seen.clone(), torn.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let guard = model.read();
                    let c = crc32fast::hash(guard.tensor_data("b").unwrap());
                    if c != original && c != patched {
                        torn.fetch_add(1, Ordering::Relaxed);
                    }
                    seen.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for i in 0..10_000 {
        let patch = MemoryPatch::new(
            format!("p{i}"),
            PatchTarget::Tensor {
                name: "b".into(),
                elements: None,
            },
            Payload::Bytes(patched_bytes.clone()),
        );
        let id = model.apply(patch).unwrap();
        model.revert(id).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert!(seen.load(Ordering::Relaxed) > 0);
    assert_eq!(torn.load(Ordering::Relaxed), 0);
    assert_eq!(model.epoch(), 20_000);
}

#[test]
fn batching_opens_fewer_windows() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_model(dir.path());
    let s = LiveModel::attach(&path, AttachMode::Owned)
        .unwrap()
        .tensor("a")
        .unwrap()
        .data_offset;
    let patches = || {
        (0..100u64)
            .map(|i| raw(&format!("p{i}"), s + i * 64..s + i * 64 + 32, 9))
            .collect::<Vec<_>>()
    };

    let one_by_one = LiveModel::attach(&path, AttachMode::Owned).unwrap();
    for p in patches() {
        one_by_one.apply(p).unwrap();
    }
    let batched = LiveModel::attach(&path, AttachMode::Owned).unwrap();
    batched.apply_all(patches()).unwrap();
    assert_eq!(one_by_one.read().bytes(), batched.read().bytes());
    assert_eq!(one_by_one.stats().windows_opened, 100);
    assert_eq!(batched.stats().windows_opened, 1);
    assert_eq!(batched.stats().writes_per_window(), 100.0);

    let mut small_windows = LiveModel::attach(&path, AttachMode::Owned).unwrap();
    small_windows.set_window_policy(WindowPolicy {
        max_window_bytes: memory_tier::page_size(),
        within_tensor: true,
    });
    small_windows.apply_all(patches()).unwrap();
    // 100 writes 64 bytes apart span 6400 bytes: two or three pages, one window each.
    assert!((2..=3).contains(&small_windows.stats().windows_opened));
}

#[test]
fn the_real_model_attached_shared_changes_only_the_tensor_and_reverts_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::copy(tests::real_model(), &path).unwrap();
    let original = std::fs::read(&path).unwrap();
    let model = LiveModel::attach(&path, AttachMode::Shared).unwrap();
    let t = model.tensor("blk.3.attn_output.weight").unwrap().clone();
    let id = model
        .apply(MemoryPatch::transform(
            "halve",
            &t.name,
            ValueTransform::Scale(0.5),
        ))
        .unwrap();
    let patched = std::fs::read(&path).unwrap();
    let changed: Vec<usize> = (0..original.len())
        .filter(|&i| original[i] != patched[i])
        .collect();
    assert!(!changed.is_empty());
    assert!(
        changed
            .iter()
            .all(|&i| t.data_range().contains(&(i as u64)))
    );
    // The change went through the journal.
    let journal = byte_tier::Journal::open_read_only(&path).unwrap();
    assert_eq!(journal.transactions().len(), 1);
    model.revert(id).unwrap();
    assert!(std::fs::read(&path).unwrap() == original);
    model.detach(false).unwrap();
    let map = MappedFile::open(&path).unwrap();
    map.parse().unwrap();
}

#[test]
fn a_revert_refuses_bytes_changed_behind_its_back_and_read_only_files_are_refused() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = small_model(dir.path());
    let model = LiveModel::attach(&path, AttachMode::Shared).unwrap();
    let b = model.tensor("b").unwrap().clone();
    let id = model
        .apply(raw("ones", b.data_offset..b.data_offset + 8, 1))
        .unwrap();
    // Another writer changes one of those bytes in the file: the shared mapping sees it.
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[9], b.data_offset + 3).unwrap();
    assert!(matches!(
        model.revert(id),
        Err(Error::ChecksumMismatch { .. })
    ));
    assert_eq!(
        model
            .view(b.data_offset..b.data_offset + 4)
            .unwrap()
            .bytes(),
        &[1, 1, 1, 9]
    );
    drop(model);

    // Read-only for everyone: permissions stop other users, the immutable attribute
    // stops root too. Where neither holds (root without chattr), the attach succeeds
    // and the test fails: it never passes without checking.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    let immutable = std::process::Command::new("chattr")
        .arg("+i")
        .arg(&path)
        .status()
        .is_ok_and(|s| s.success());
    let result = LiveModel::attach(&path, AttachMode::Shared);
    if immutable {
        let undone = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&path)
            .status();
        assert!(undone.is_ok_and(|s| s.success()));
    }
    assert!(
        matches!(result, Err(Error::Bytes(byte_tier::Error::ReadOnly { .. }))),
        "{result:?} (immutable attribute set: {immutable})"
    );
}

#[test]
fn registered_patches_apply_by_name_and_disabled_ones_are_refused() {
    use memory_tier::MemoryPatcher;
    let dir = tempfile::tempdir().unwrap();
    let model = LiveModel::attach(small_model(dir.path()), AttachMode::Owned).unwrap();
    let patcher: &dyn MemoryPatcher = &model;
    patcher
        .add(MemoryPatch::transform("zero q", "q", ValueTransform::Zero))
        .unwrap();
    model.set_enabled("zero q", false).unwrap();
    assert!(matches!(
        model.apply_registered("zero q"),
        Err(Error::Disabled(_))
    ));
    model.set_enabled("zero q", true).unwrap();
    let id = model.apply_registered("zero q").unwrap();
    assert_eq!(patcher.history().last().unwrap().id, id);
    assert_eq!(patcher.stats().applied_now, 1);
}

#[test]
fn a_callers_raw_region_is_protected_while_attached_and_given_back_writable() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(small_model(dir.path())).unwrap();
    let page = memory_tier::page_size();
    let mut memory = memmap2::MmapMut::map_anon(bytes.len().div_ceil(page) * page).unwrap();
    memory[..bytes.len()].copy_from_slice(&bytes);
    let start = std::ptr::NonNull::new(memory.as_mut_ptr()).unwrap();
    let len = memory.len();
    // SAFETY: `memory` is a page-aligned anonymous mapping of `len` bytes that outlives
    // the model, and nothing else touches it until the model is detached.
    let model = unsafe { LiveModel::attach_raw(start, len, None) }.unwrap();
    let s = model.tensor("b").unwrap().data_offset;
    model.apply(raw("in place", s..s + 4, 0xcd)).unwrap();
    model.detach(true).unwrap();
    // Given back as it was, and writable again.
    memory[0] = b'G';
    assert_eq!(&memory[..bytes.len()], &bytes[..]);

    // An unaligned region is refused before anything is protected.
    let unaligned = std::ptr::NonNull::new(memory[1..].as_mut_ptr()).unwrap();
    // SAFETY: as above; the call fails on the alignment check and keeps nothing.
    let refused = unsafe { LiveModel::attach_raw(unaligned, page, None) };
    assert!(matches!(refused, Err(Error::UnalignedRegion { .. })));
}

#[test]
fn an_applied_transform_is_planned_once_and_its_report_is_the_written_one() {
    let dir = tempfile::tempdir().unwrap();
    let model = LiveModel::attach(small_model(dir.path()), AttachMode::Owned).unwrap();
    // A transform that requantizes: the costly kind, which used to be planned twice.
    let patch = MemoryPatch::transform("offset q", "q", ValueTransform::Offset(0.25));
    let before = byte_tier::codec::transforms_run();
    let reports = model.apply_reported(vec![patch]).unwrap();
    // The counter is this thread's: other tests planning at the same time do not count.
    let planned = byte_tier::codec::transforms_run() - before;
    assert_eq!(planned, 1, "the transform was planned {planned} times");
    let report = reports[0].transform.clone().unwrap();
    assert_eq!(report.path, byte_tier::codec::TransformPath::Requantized);
    assert!(report.rms_error > 0.0);
}

#[test]
fn a_transaction_plan_is_applied_as_planned_and_writes_nothing_until_then() {
    let dir = tempfile::tempdir().unwrap();
    let path = small_model(dir.path());
    let original = std::fs::read(&path).unwrap();
    let model = LiveModel::attach(&path, AttachMode::Shared).unwrap();
    let patch = MemoryPatch::transform("offset q", "q", ValueTransform::Offset(0.25));
    let plan = model.plan_transaction(vec![patch]).unwrap();
    // Planning wrote nothing, and the plan names its writes inside the tensor.
    assert_eq!(std::fs::read(&path).unwrap(), original);
    assert!(!plan.is_noop());
    let q = model.tensor("q").unwrap().data_range();
    assert!(
        plan.writes
            .iter()
            .all(|w| w.offset >= q.start && w.offset + w.len <= q.end)
    );
    assert_eq!(plan.patches[0].path.as_deref(), Some("requantized"));
    let writes: Vec<(u64, u64)> = plan.writes.iter().map(|w| (w.offset, w.len)).collect();
    // Applying computes no value again.
    let before = byte_tier::codec::transforms_run();
    let reports = model.apply_planned(plan).unwrap();
    assert_eq!(byte_tier::codec::transforms_run() - before, 0);
    assert!(reports[0].journal_transaction.is_some());
    // The file changed exactly inside the planned writes.
    let after = std::fs::read(&path).unwrap();
    let mut at = 0usize;
    for (offset, len) in writes {
        let (start, end) = (offset as usize, (offset + len) as usize);
        assert_eq!(original[at..start], after[at..start]);
        assert_ne!(original[start..end], after[start..end]);
        at = end;
    }
    assert_eq!(original[at..], after[at..]);
}

#[test]
fn a_plan_applied_after_the_model_changed_is_refused_as_stale() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let path = small_model(dir.path());
    let model = LiveModel::attach(&path, AttachMode::Shared).unwrap();
    let q = model.tensor("q").unwrap().data_range();

    // The bytes the plan read change behind the model's back (another writer of the
    // file): the plan no longer says what applying it does.
    let plan = model
        .plan_transaction(vec![MemoryPatch::transform(
            "scale q",
            "q",
            ValueTransform::Scale(2.0),
        )])
        .unwrap();
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.write_all_at(&[0x55; 8], q.start + 2).unwrap();
    let changed = std::fs::read(&path).unwrap();
    match model.apply_planned(plan) {
        Err(Error::StalePlan { what, .. }) => assert!(what.contains("bytes"), "{what}"),
        other => panic!("a stale plan was not refused: {other:?}"),
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        changed,
        "a refused plan wrote"
    );

    // A patch applied between the plan and its apply changes what it would displace.
    let plan = model
        .plan_transaction(vec![
            MemoryPatch::transform("zero a", "a", ValueTransform::Zero).with_priority(1),
        ])
        .unwrap();
    let a = model.tensor("a").unwrap().data_range();
    model.apply(raw("under", a.start..a.start + 32, 7)).unwrap();
    match model.apply_planned(plan) {
        Err(Error::StalePlan { what, .. }) => assert!(what.contains("applied"), "{what}"),
        other => panic!("a stale plan was not refused: {other:?}"),
    }
    assert_eq!(model.applied().len(), 1);
}
