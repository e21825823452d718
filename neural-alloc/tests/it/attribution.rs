//! Telling the program's leaks from the blocks the runtime holds: a planted leak is
//! reported with its exact bytes and call site, and a block made for a lazily made static
//! is reported apart, as held by the runtime.

use std::alloc::GlobalAlloc;
use std::sync::OnceLock;

use neural_alloc::{Config, NeuralAlloc, RuntimeHold};

use crate::layout;

/// An instance that tracks every block and keeps its return addresses, as
/// `HOTPATCH_ALLOC=track` does for the `hotpatch` binary.
fn tracking() -> &'static NeuralAlloc {
    Box::leak(Box::new(NeuralAlloc::with_config(Config {
        tracking: true,
        backtraces: true,
        ..Config::DEFAULT
    })))
}

#[inline(never)]
fn plant_leak(allocator: &NeuralAlloc) -> (*mut u8, u32) {
    let line = line!() + 2;
    // SAFETY: a non-zero layout; the block is left live on purpose.
    let block = unsafe { allocator.alloc(layout(1234, 8)) };
    (block, line)
}

#[test]
#[cfg(not(miri))] // Resolving return addresses reads the binary's debug information.
fn attribution_a_planted_leak_is_reported_with_its_bytes_and_call_site() {
    let allocator = tracking();
    let (block, line) = plant_leak(allocator);
    assert!(!block.is_null());
    let attribution = allocator.leak_report().attribute();
    assert_eq!(attribution.leaked_blocks(), 1, "{attribution}");
    assert_eq!(attribution.leaked_bytes(), 1234, "{attribution}");
    let site = attribution.leaks[0].call_site.as_ref().unwrap();
    assert!(site.function.ends_with("plant_leak"), "{site}");
    assert!(
        site.file.as_deref().unwrap().ends_with("attribution.rs"),
        "{site}"
    );
    assert_eq!(site.line, Some(line), "{site}");
    assert!(attribution.runtime.is_empty(), "{attribution}");
    let text = attribution.to_string();
    assert!(
        text.starts_with("neural-alloc: 1 leak, 1234 bytes"),
        "{text}"
    );
    assert!(text.contains(&format!("attribution.rs:{line}")), "{text}");
    // SAFETY: the block was allocated above with this layout.
    unsafe { allocator.dealloc(block, layout(1234, 8)) };
    let attribution = allocator.leak_report().attribute();
    assert_eq!(attribution.leaked_blocks(), 0, "{attribution}");
}

/// A block kept by a lazily made static, as the standard library keeps its own.
struct KeptBlock(*mut u8);

// SAFETY: the pointer is only compared, never dereferenced.
unsafe impl Send for KeptBlock {}
// SAFETY: as above.
unsafe impl Sync for KeptBlock {}

#[test]
#[cfg(not(miri))] // As above.
fn attribution_a_block_made_for_a_lazily_made_static_is_held_by_the_runtime_not_leaked() {
    static KEPT: OnceLock<KeptBlock> = OnceLock::new();
    let allocator = tracking();
    let kept = KEPT.get_or_init(|| {
        // SAFETY: a non-zero layout; the static keeps the block for the life of the
        // process.
        KeptBlock(unsafe { allocator.alloc(layout(96, 8)) })
    });
    assert!(!kept.0.is_null());
    let attribution = allocator.leak_report().attribute();
    assert_eq!(attribution.leaked_blocks(), 0, "{attribution}");
    assert_eq!(attribution.runtime.len(), 1, "{attribution}");
    let held = &attribution.runtime[0];
    assert_eq!((held.blocks, held.bytes), (1, 96));
    assert_eq!(held.hold, Some(RuntimeHold::LazyStatic));
    let text = attribution.to_string();
    assert!(text.starts_with("neural-alloc: 0 leaks"), "{text}");
    assert!(text.contains("held by the runtime"), "{text}");
}
