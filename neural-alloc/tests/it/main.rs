//! Integration tests of neural-alloc through its public API.
//!
//! This binary also runs with a `NeuralAlloc` as its global allocator, so the test
//! harness, threads, formatting and collections all exercise the `GlobalAlloc` adapter.
//! Each test uses its own instance for the behaviour it checks, so statistics and
//! reports are exact however the harness schedules tests.

mod arena;
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
