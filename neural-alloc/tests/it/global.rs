//! The `GlobalAlloc` adapter, both called directly and as this binary's global allocator.

use std::alloc::GlobalAlloc;
use std::collections::{BTreeMap, HashMap};

use crate::{GLOBAL, counting, layout};

#[test]
fn std_collections_work_on_the_global_instance() {
    // Smaller under Miri, whose interpreter makes every allocation slow.
    let (entries, big_len) = if cfg!(miri) {
        (200u64, 1 << 14)
    } else {
        (2000, 1 << 20)
    };
    let mut map: HashMap<String, Vec<u64>> = HashMap::new();
    for key in 0..entries {
        map.entry(format!("key-{}", key % 30))
            .or_default()
            .push(key);
    }
    let tree: BTreeMap<_, _> = map
        .iter()
        .map(|(key, values)| (key.clone(), values.len()))
        .collect();
    assert_eq!(tree.len(), 30);
    assert_eq!(tree.values().sum::<usize>(), entries as usize);
    let big = vec![1u8; big_len];
    assert_eq!(
        big.iter().map(|&byte| usize::from(byte)).sum::<usize>(),
        big_len
    );
    assert!(GLOBAL.stats().current_count > 0);
    assert_eq!(GLOBAL.corruption_counts().total(), 0);
}

#[test]
fn the_adapter_allocates_reallocates_and_frees() {
    let allocator = counting();
    // SAFETY: non-zero layouts; every block is freed with the layout it has.
    unsafe {
        let small = allocator.alloc(layout(24, 8));
        assert!(!small.is_null());
        let zeroed = allocator.alloc_zeroed(layout(3000, 64));
        assert!(
            std::slice::from_raw_parts(zeroed, 3000)
                .iter()
                .all(|&byte| byte == 0)
        );
        let grown = allocator.realloc(small, layout(24, 8), 30_000);
        let shrunk = allocator.realloc(grown, layout(30_000, 8), 12);
        allocator.dealloc(shrunk, layout(12, 8));
        allocator.dealloc(zeroed, layout(3000, 64));
    }
    assert_eq!(allocator.stats().current_count, 0);
    assert_eq!(allocator.corruption_counts().total(), 0);
}

#[test]
fn tracking_switches_on_from_the_environment_variable() {
    let allocator = counting();
    allocator.set_tracking(false);
    // Not set in this process: the setting stays as it is.
    assert!(std::env::var_os(neural_alloc::HOTPATCH_ALLOC_VARIABLE).is_none());
    assert!(!neural_alloc::enable_tracking_from_env(allocator));
    assert!(!allocator.config().tracking);
    let untracked = allocator.allocate(layout(8, 8)).unwrap();
    allocator.set_tracking(true);
    let tracked = allocator.allocate(layout(8, 8)).unwrap();
    let report = allocator.leak_report();
    assert_eq!(report.sites.len(), 2);
    assert_eq!(report.sites.iter().filter(|site| site.tracked).count(), 1);
    // SAFETY: live blocks, not used afterwards.
    unsafe {
        allocator.deallocate(untracked, layout(8, 8)).unwrap();
        allocator.deallocate(tracked, layout(8, 8)).unwrap();
    }
}

#[cfg(all(target_os = "linux", not(miri)))]
#[test]
fn global_allocations_are_grouped_by_backtrace_when_asked() {
    let allocator = counting();
    allocator.set_config(neural_alloc::Config {
        backtraces: true,
        ..allocator.config()
    });
    // SAFETY: a non-zero layout; freed below.
    let block = unsafe { allocator.alloc(layout(48, 8)) };
    let report = allocator.leak_report();
    assert_eq!(report.sites.len(), 1);
    assert!(report.sites[0].site.is_none());
    assert!(!report.sites[0].frames.is_empty(), "{report}");
    // SAFETY: live block, not used afterwards.
    unsafe { allocator.dealloc(block, layout(48, 8)) };
}
