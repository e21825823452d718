//! Glue for binaries: switching tracking on from the environment, printing the leak
//! report at exit, and the guard that keeps panics from unwinding out of `GlobalAlloc`.

use std::io::Write as _;

use crate::NeuralAlloc;

/// Environment variable read by [`enable_tracking_from_env`].
pub const HOTPATCH_ALLOC_VARIABLE: &str = "HOTPATCH_ALLOC";

/// Switches tracking on when `HOTPATCH_ALLOC` is `track`, or `track-backtrace` to also
/// keep return addresses; returns whether tracking is now on. Other values leave the
/// settings alone.
pub fn enable_tracking_from_env(allocator: &NeuralAlloc) -> bool {
    let wanted = std::env::var_os(HOTPATCH_ALLOC_VARIABLE);
    let mut config = allocator.config();
    match wanted.as_deref().and_then(|value| value.to_str()) {
        Some("track") => config.tracking = true,
        Some("track-backtrace") => {
            config.tracking = true;
            config.backtraces = true;
        }
        _ => return config.tracking,
    }
    allocator.set_config(config);
    true
}

/// Writes the leak report (live blocks grouped by call site) to standard error.
pub fn print_leak_report(allocator: &NeuralAlloc) {
    let report = allocator.leak_report();
    let mut stderr = std::io::stderr().lock();
    let _ = write!(stderr, "{report}");
}

/// Aborts the process if dropped during unwinding: `GlobalAlloc` methods must not unwind.
/// Forgotten on the normal path, so it costs nothing there.
pub(crate) struct AbortOnUnwind;

impl Drop for AbortOnUnwind {
    fn drop(&mut self) {
        crate::sys::write_stderr(b"neural-alloc: panic inside the allocator, aborting\n");
        std::process::abort();
    }
}
