//! Glue for binaries: switching tracking on from the environment, printing the leak
//! report at exit, and the guard that keeps panics from unwinding out of `GlobalAlloc`.

use std::io::Write as _;

use crate::NeuralAlloc;

/// Environment variable read by [`enable_tracking_from_env`].
pub const HOTPATCH_ALLOC_VARIABLE: &str = "HOTPATCH_ALLOC";

/// Switches tracking on when `HOTPATCH_ALLOC` is `track` or `track-backtrace`; returns
/// whether tracking is now on. Other values leave the settings alone. Both keep each
/// block's return addresses, which tell the program's leaks from the blocks the runtime
/// holds; `track-backtrace` also prints them.
pub fn enable_tracking_from_env(allocator: &NeuralAlloc) -> bool {
    let wanted = std::env::var_os(HOTPATCH_ALLOC_VARIABLE);
    let mut config = allocator.config();
    match wanted.as_deref().and_then(|value| value.to_str()) {
        Some("track" | "track-backtrace") => {
            config.tracking = true;
            config.backtraces = true;
        }
        _ => return config.tracking,
    }
    allocator.set_config(config);
    true
}

/// Writes the leak report to standard error: the program's leaks by call site, then the
/// blocks the runtime holds for the life of the process (see [`LeakReport::attribute`]);
/// with `HOTPATCH_ALLOC=track-backtrace`, also every live block's return addresses.
///
/// [`LeakReport::attribute`]: crate::LeakReport::attribute
pub fn print_leak_report(allocator: &NeuralAlloc) {
    let report = allocator.leak_report();
    let attribution = report.attribute();
    let mut stderr = std::io::stderr().lock();
    let _ = write!(stderr, "{attribution}");
    if std::env::var_os(HOTPATCH_ALLOC_VARIABLE).is_some_and(|value| value == "track-backtrace") {
        let _ = write!(stderr, "{report}");
    }
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
