//! A full disk, met as a file-size limit (`RLIMIT_FSIZE`, set for the child with util-linux's
//! `prlimit`): the command exits 1 with a message naming the limit, instead of being
//! killed by SIGXFSZ, and the model and its journal are as they were.

use std::path::Path;
use std::process::{Command, Output};

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");

fn demo_model(dir: &Path) -> std::path::PathBuf {
    let status = Command::new(HOTPATCH)
        .args(["demo", "--keep"])
        .arg(dir)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    dir.join("demo-llama.gguf")
}

/// Runs hotpatch with a file-size limit of `limit` bytes.
fn hotpatch_limited(limit: u64, args: &[&str]) -> Output {
    Command::new("prlimit")
        .arg(format!("--fsize={limit}:{limit}"))
        .arg("--")
        .arg(HOTPATCH)
        .args(args)
        .output()
        .expect("run prlimit (util-linux)")
}

fn assert_failed_naming_the_limit(output: &Output, limit: u64) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    // Exit code 1, not death by SIGXFSZ (which a shell reports as 153).
    assert_eq!(
        output.status.code(),
        Some(1),
        "{:?}: {stderr}",
        output.status
    );
    assert!(
        stderr.contains(&format!("file-size limit of {limit} bytes"))
            && stderr.contains("ulimit -f"),
        "{stderr}"
    );
    stderr
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
fn full_disk_a_journal_write_past_the_file_size_limit_fails_and_leaves_model_and_journal_as_they_were()
 {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let journal = dir.path().join("demo-llama.gguf.hotpatch-journal");
    let model_before = std::fs::read(&model).unwrap();
    let journal_before = std::fs::read(&journal).unwrap();
    let names_before = file_names(dir.path());
    // The tensor's undo record (512 KiB of F32) does not fit under the limit; the model,
    // written through its shared mapping, is not bound by it.
    let limit = journal_before.len() as u64 + 256 * 1024;
    let output = hotpatch_limited(
        limit,
        &[
            "patch",
            model.to_str().unwrap(),
            "--tensor",
            "blk.0.ffn_down.weight",
            "--scale",
            "0.5",
        ],
    );
    let message = assert_failed_naming_the_limit(&output, limit);
    assert!(message.contains("journal"), "{message}");
    assert!(
        std::fs::read(&model).unwrap() == model_before,
        "the model changed"
    );
    assert!(
        std::fs::read(&journal).unwrap() == journal_before,
        "the partial journal record was not cut back"
    );
    assert_eq!(file_names(dir.path()), names_before);
    // Nothing is left to recover, and the same patch without the limit succeeds.
    let status = Command::new(HOTPATCH)
        .args(["patch", model.to_str().unwrap()])
        .args(["--tensor", "blk.0.ffn_down.weight", "--scale", "0.5"])
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(std::fs::read(&model).unwrap() != model_before);
}

#[test]
fn full_disk_a_rewrite_past_the_file_size_limit_fails_and_removes_its_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let model = demo_model(dir.path());
    let model_before = std::fs::read(&model).unwrap();
    let names_before = file_names(dir.path());
    let limit = 1 << 20;
    let output = hotpatch_limited(limit, &["prune", model.to_str().unwrap(), "--layers", "3"]);
    assert_failed_naming_the_limit(&output, limit);
    assert!(
        std::fs::read(&model).unwrap() == model_before,
        "the model changed"
    );
    assert_eq!(file_names(dir.path()), names_before);
}
