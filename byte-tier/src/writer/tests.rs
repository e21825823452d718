use std::path::Path;

use super::{parent_dir, sync_dir};

#[test]
fn the_directory_of_a_bare_file_name_is_the_current_one() {
    assert_eq!(parent_dir(Path::new("model.gguf")), Path::new("."));
    assert_eq!(
        parent_dir(Path::new("models/model.gguf")),
        Path::new("models")
    );
    assert_eq!(parent_dir(Path::new("/model.gguf")), Path::new("/"));
    assert_eq!(parent_dir(Path::new("/")), Path::new("."));
}

#[test]
fn syncing_the_empty_directory_syncs_the_current_one() {
    // `Path::new("cfg.json").parent()` is the empty path; a caller that passes it on
    // must not fail with "sync directory : No such file or directory".
    sync_dir(Path::new("")).unwrap();
    sync_dir(Path::new(".")).unwrap();
    let missing = sync_dir(Path::new("no/such/directory")).unwrap_err();
    assert!(
        missing.to_string().contains("no/such/directory"),
        "{missing}"
    );
}

/// A file of tensors of odd sizes (so that padding falls between kernel copies), some
/// data changed after the parse the writer starts from.
fn odd_model(dir: &Path) -> std::path::PathBuf {
    let mut w = super::GgufWriter::new();
    w.set("general.architecture", "llama")
        .set("general.alignment", crate::Value::U32(64));
    for t in 0..6u32 {
        let n = 1 + 977 * t as usize;
        let bytes: Vec<u8> = (0..n).map(|i| (i as u32 * 31 + t) as u8).collect();
        w.add_tensor(super::TensorSpec::from_bytes(
            format!("t{t}"),
            vec![n as u64],
            crate::GgmlType::I8,
            bytes,
        ));
    }
    let path = dir.join("odd.gguf");
    w.write_to_path(&path).unwrap();
    path
}

#[test]
fn a_rewrite_into_a_file_copies_mapped_data_by_the_kernel_and_equals_a_buffered_write() {
    let dir = tempfile::tempdir().unwrap();
    let source = odd_model(dir.path());
    let map = crate::MappedFile::open(&source).unwrap();
    let gguf = map.parse().unwrap();
    assert!(gguf.source_file().is_some());
    let mut writer = super::GgufWriter::from_gguf(&gguf);
    assert!(matches!(
        writer.tensors()[0].data,
        super::TensorData::Mapped { .. }
    ));
    // One tensor replaced by owned bytes, one removed: copies and writes interleave.
    writer.tensors_mut()[2].data = super::TensorData::Bytes(vec![7u8; 1955].into());
    writer.tensors_mut().remove(4);
    let mut buffered = Vec::new();
    writer.write_to(&mut buffered).unwrap();
    let out = dir.path().join("out.gguf");
    let written = writer.write_to_path(&out).unwrap();
    assert_eq!(written, buffered.len() as u64);
    assert!(std::fs::read(&out).unwrap() == buffered);
    // A parse of bytes in memory has no file: its data is written from memory.
    let bytes = std::fs::read(&source).unwrap();
    let in_memory = crate::Gguf::parse(&bytes).unwrap();
    assert!(in_memory.source_file().is_none());
    let copy = dir.path().join("copy.gguf");
    super::GgufWriter::from_gguf(&in_memory)
        .write_to_path(&copy)
        .unwrap();
    assert!(std::fs::read(&copy).unwrap() == bytes);
}
