//! Integration tests of neural-alloc through its public API.
//!
//! This binary also runs with a `NeuralAlloc` as its global allocator, so the test
//! harness, threads, formatting and collections all exercise the `GlobalAlloc` adapter.
//! Each test uses its own instance for the behaviour it checks, so statistics and
//! reports are exact however the harness schedules tests.

mod arena;
mod attribution;
mod bad_input;
mod checks;
mod global;
mod stress;

use std::alloc::Layout;

use neural_alloc::{Config, CorruptionAction, NeuralAlloc};

#[global_allocator]
static GLOBAL: NeuralAlloc = NeuralAlloc::new();

/// Settings for tests that provoke corruption: count it instead of aborting.
fn counting_config() -> Config {
    Config {
        tracking: true,
        poison: true,
        guard_checks: true,
        on_corruption: CorruptionAction::Count,
        ..Config::DEFAULT
    }
}

/// An instance with [`counting_config`] that outlives any thread.
fn counting() -> &'static NeuralAlloc {
    Box::leak(Box::new(NeuralAlloc::with_config(counting_config())))
}

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

/// Blocks handed to another thread, which frees them.
struct Handover(Vec<std::ptr::NonNull<u8>>);

// SAFETY: the blocks are plain memory owned by the receiving thread from then on.
unsafe impl Send for Handover {}

impl Handover {
    /// Taking the whole value makes closures capture all of it, not its field.
    fn take(self) -> Vec<std::ptr::NonNull<u8>> {
        self.0
    }
}

/// Runs the ignored test `name` of this binary as a child process with the extra
/// environment `env` and, when given, `limit_bytes` of address space.
#[cfg(all(unix, not(miri)))]
fn run_child(name: &str, env: &[(&str, &str)], limit_bytes: Option<u64>) -> std::process::Output {
    let mut command = std::process::Command::new(std::env::current_exe().unwrap());
    command
        .args([
            "--ignored",
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
        ])
        .envs(env.iter().copied());
    if let Some(limit) = limit_bytes {
        use std::os::unix::process::CommandExt;
        // SAFETY: the hook only calls `setrlimit`, which is async-signal-safe, and
        // allocates nothing.
        unsafe {
            command.pre_exec(move || {
                let bound = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_AS, &bound) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            })
        };
    }
    command.output().unwrap()
}
