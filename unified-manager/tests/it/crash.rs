//! Crash consistency of in-place edits: a child process is stopped between every durable
//! step (failpoints) and killed with SIGKILL at arbitrary times; after recovery the file
//! is always byte-identical to the original or to the fully patched file.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");

struct Fixture {
    _dir: tempfile::TempDir,
    original: Vec<u8>,
    patched: Vec<u8>,
    model: PathBuf,
    work: PathBuf,
}

/// The edit under test: two disjoint writes in one transaction, large enough (2 x 1 MiB)
/// that a kill can land while the file is being written.
fn edit_args(file: &Path) -> Vec<String> {
    vec![
        "bytes".into(),
        file.to_str().unwrap().into(),
        "swap".into(),
        "--first".into(),
        "8192".into(),
        "--second".into(),
        "2105344".into(),
        "--len".into(),
        "1048576".into(),
    ]
}

fn run_hotpatch(args: &[String], failpoint: Option<&str>) -> std::process::ExitStatus {
    let mut command = Command::new(HOTPATCH);
    command.args(args).stdout(std::process::Stdio::null());
    match failpoint {
        Some(point) => command.env("HOTPATCH_FAILPOINT", point),
        None => command.env_remove("HOTPATCH_FAILPOINT"),
    };
    command.status().expect("failed to run hotpatch")
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let status = Command::new(HOTPATCH)
        .args(["demo", "--keep"])
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let model = dir.path().join("demo-llama.gguf");
    let original = std::fs::read(&model).unwrap();
    let work = dir.path().join("work.gguf");
    std::fs::write(&work, &original).unwrap();
    assert!(run_hotpatch(&edit_args(&work), None).success());
    let patched = std::fs::read(&work).unwrap();
    assert_ne!(original, patched);
    Fixture {
        _dir: dir,
        original,
        patched,
        model,
        work,
    }
}

impl Fixture {
    /// A fresh copy of the original, with no journal.
    fn reset(&self) {
        std::fs::copy(&self.model, &self.work).unwrap();
        let _ = std::fs::remove_file(byte_tier::journal_path(&self.work));
    }

    fn recover(&self) -> Vec<u8> {
        let status = Command::new(HOTPATCH)
            .arg("recover")
            .arg(&self.work)
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
        std::fs::read(&self.work).unwrap()
    }
}

#[test]
fn a_crash_at_every_durable_step_leaves_the_old_or_the_new_file() {
    let f = fixture();
    // Where the process dies, and which file recovery must give back.
    let cases = [
        ("after-journal-sync", false),
        ("mid-write", false),
        ("after-file-sync", false),
        ("after-commit", true),
    ];
    for (point, committed) in cases {
        f.reset();
        let status = run_hotpatch(&edit_args(&f.work), Some(point));
        assert_eq!(status.signal(), Some(libc_sigabrt()), "{point}: {status:?}");
        let after = f.recover();
        let expected = if committed { &f.patched } else { &f.original };
        assert!(
            after == *expected,
            "{point}: the file is neither as expected"
        );

        // A crash in the middle of recovery is recovered by the next recovery.
        if !committed {
            f.reset();
            run_hotpatch(&edit_args(&f.work), Some("mid-write"));
            let status = Command::new(HOTPATCH)
                .arg("recover")
                .arg(&f.work)
                .env("HOTPATCH_FAILPOINT", "recovery-after-first-restore")
                .status()
                .unwrap();
            assert_eq!(status.signal(), Some(libc_sigabrt()));
            assert!(
                f.recover() == f.original,
                "{point}: recovery after a crashed recovery"
            );
        }
    }
}

/// SIGABRT, which `std::process::abort` raises at a failpoint.
fn libc_sigabrt() -> i32 {
    6
}

#[test]
fn sigkill_at_arbitrary_times_leaves_the_old_or_the_new_file() {
    let f = fixture();
    const TRIALS: u32 = 40;
    // How long an uninterrupted edit takes: the kills are spread from the start of the
    // process to past its end, so that both outcomes must occur.
    f.reset();
    let started = Instant::now();
    let status = Command::new(HOTPATCH)
        .args(edit_args(&f.work))
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let runtime = started.elapsed();
    let (mut old, mut new) = (0, 0);
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for trial in 0..TRIALS {
        f.reset();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        // Evenly over 0..1.5 x the runtime, with a random jitter inside each step.
        let step = runtime.mul_f64(1.5) / TRIALS;
        let delay = step * trial + step.mul_f64((seed % 1000) as f64 / 1000.0);
        let mut child = Command::new(HOTPATCH)
            .args(edit_args(&f.work))
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(delay);
        // SIGKILL: no destructor, no flush, no chance to finish. (The process may have
        // finished already: the kill then has nothing to do.)
        let _already_exited = child.kill();
        child.wait().unwrap();
        let after = f.recover();
        if after == f.original {
            old += 1;
        } else if after == f.patched {
            new += 1;
        } else {
            panic!("after a kill {delay:?} in, the file is neither the old nor the new one");
        }
    }
    eprintln!(
        "{TRIALS} kills over {:?}: {old} rolled back to the original, {new} fully patched",
        runtime.mul_f64(1.5)
    );
    assert!(
        old > 0 && new > 0,
        "the kills must land both before and after the commit ({old} old, {new} new)"
    );
}

/// Runs `hotpatch` on `args` and asserts it succeeded.
fn hotpatch_ok(args: &[&str]) {
    let output = Command::new(HOTPATCH).args(args).output().unwrap();
    assert!(
        output.status.success(),
        "hotpatch {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Copies a file and its journal (the journal holds the live patches' state).
fn copy_with_journal(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap();
    let (journal_from, journal_to) = (byte_tier::journal_path(from), byte_tier::journal_path(to));
    if journal_from.exists() {
        std::fs::copy(journal_from, journal_to).unwrap();
    } else {
        let _absent = std::fs::remove_file(journal_to);
    }
}

#[test]
fn a_crash_at_every_step_of_a_layered_patch_or_revert_stays_consistent_for_both_patches() {
    let f = fixture();
    let dir = f.work.parent().unwrap().to_owned();
    let base = dir.join("layers.gguf");
    std::fs::write(&base, &f.original).unwrap();
    let path = |p: &Path| p.to_str().unwrap().to_owned();
    let tensor = "blk.1.ffn_down.weight";
    let a = ["--tensor", tensor, "--scale", "2", "--priority", "1"];
    let b = [
        "--tensor",
        tensor,
        "--range",
        "0..64",
        "--scale",
        "0.5",
        "--priority",
        "5",
    ];
    // Three states to start a step from: nothing applied; A applied; A under B.
    let with_a = dir.join("with-a.gguf");
    copy_with_journal(&base, &with_a);
    hotpatch_ok(&[&["patch", &path(&with_a)][..], &a[..]].concat());
    let with_ab = dir.join("with-ab.gguf");
    copy_with_journal(&with_a, &with_ab);
    hotpatch_ok(&[&["patch", &path(&with_ab)][..], &b[..]].concat());
    let work = dir.join("layers-work.gguf");
    let steps: [(&Path, Vec<String>); 3] = [
        // Apply B over A.
        (
            &with_a,
            [&["patch", &path(&work)][..], &b[..]]
                .concat()
                .iter()
                .map(|s| s.to_string())
                .collect(),
        ),
        // Revert B: A comes back.
        (
            &with_ab,
            vec!["revert".into(), path(&work), "--last".into()],
        ),
        // Revert A while B covers part of it: the transaction that applied A is the
        // first one in the journal.
        (&with_ab, vec!["revert".into(), path(&work), "1".into()]),
    ];
    for (start, args) in &steps {
        for point in ["after-journal-sync", "after-file-sync", "after-commit"] {
            copy_with_journal(start, &work);
            let status = run_hotpatch(args, Some(point));
            assert_eq!(status.signal(), Some(libc_sigabrt()), "{args:?} at {point}");
            // Whatever the step left, reverting everything that is listed brings the
            // original file back, byte for byte: both patches' undo data survived.
            for _ in 0..4 {
                let output = Command::new(HOTPATCH)
                    .args(["revert", &path(&work), "--last"])
                    .output()
                    .unwrap();
                if !output.status.success() {
                    let message = String::from_utf8_lossy(&output.stderr);
                    assert!(
                        message.contains("nothing to revert"),
                        "{args:?} at {point}: {message}"
                    );
                    break;
                }
            }
            assert!(
                std::fs::read(&work).unwrap() == f.original,
                "{args:?} stopped at {point}: reverting every listed patch did not restore the file"
            );
        }
    }
}
