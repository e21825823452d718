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
