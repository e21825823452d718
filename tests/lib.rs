//! Cross-crate integration tests of the hotpatch workspace; the tests live in `it/`.
