//! The shared test support, under the name the test modules use.

#[allow(unused_imports)]
pub use tests::{cache_dir, oracle_python, real_model, run_python};
