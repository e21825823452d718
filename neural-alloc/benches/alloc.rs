//! Nanoseconds per allocate/free pair for each size class, against the system
//! allocator (glibc), mimalloc and jemalloc, all called through their `GlobalAlloc`
//! implementations in the same run.
//!
//! Patterns: a hot loop (allocate, free, repeat), a batch (allocate 1,000, then free
//! them in order), the batch with the first and last byte of each block written, and
//! two threads where one allocates and the other frees. Our allocator runs with
//! tracking off (the release default) and guard checks on, plus variants without guard
//! checks and with tracking on, to show what those cost.
//!
//! Each benchmark runs on its own, so on a shared machine a slow spell can land on one
//! allocator and not the next; `benches/compare.rs` interleaves them for ratios.
//!
//! Run: `cargo bench -p neural-alloc --bench alloc -- --measurement-time 2`

mod patterns;

use std::alloc::{GlobalAlloc, Layout};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use neural_alloc::{Config, NeuralAlloc};
use patterns::{
    JEMALLOC, MIMALLOC, NEURAL, NEURAL_NO_GUARD, SYSTEM, batch, hot_loop, request_sizes,
};

static NEURAL_TRACKING: NeuralAlloc = NeuralAlloc::with_config(Config {
    tracking: true,
    poison: false,
    ..Config::DEFAULT
});

/// Pointers per message in the two-thread pattern.
const MESSAGE: usize = 256;

/// [`hot_loop`] with a layout known at compile time, as for `Box<T>` or `Arc<T>`: an
/// allocator whose hit path is inlined can fold its size-class lookup away.
fn hot_loop_const<A: GlobalAlloc, const SIZE: usize>(allocator: &A, iterations: u64) -> Duration {
    const { assert!(SIZE > 0) };
    // A constant size far below isize::MAX; 8 is a power of two.
    hot_loop(
        allocator,
        Layout::from_size_align(SIZE, 8).unwrap(),
        iterations,
    )
}

/// Pointers in flight between the two threads, as addresses.
type Message = Box<[usize; MESSAGE]>;

fn cross_thread<A: GlobalAlloc + Sync>(
    allocator: &'static A,
    layout: Layout,
    iterations: u64,
) -> Duration {
    let messages = iterations.div_ceil(MESSAGE as u64).max(1);
    let (to_freer, freer_inbox) = mpsc::sync_channel::<Message>(8);
    let (to_allocator, allocator_inbox) = mpsc::sync_channel::<Message>(16);
    for _ in 0..8 {
        to_allocator.send(Box::new([0; MESSAGE])).unwrap();
    }
    let freer = std::thread::spawn(move || {
        while let Ok(message) = freer_inbox.recv() {
            for &address in message.iter() {
                // SAFETY: allocated by the other thread with this layout; freed once.
                unsafe {
                    allocator.dealloc(std::ptr::with_exposed_provenance_mut(address), layout)
                };
            }
            if to_allocator.send(message).is_err() {
                break;
            }
        }
    });
    let start = Instant::now();
    for _ in 0..messages {
        let mut message = allocator_inbox.recv().unwrap();
        for slot in message.iter_mut() {
            // SAFETY: a non-zero layout; the other thread frees it.
            *slot = unsafe { allocator.alloc(layout) }.expose_provenance();
        }
        to_freer.send(message).unwrap();
    }
    drop(to_freer);
    freer.join().unwrap();
    // Scaled to the requested iteration count, per allocate/free pair.
    start
        .elapsed()
        .mul_f64(iterations as f64 / (messages * MESSAGE as u64) as f64)
}

fn hot(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("hot");
    for size in request_sizes() {
        let layout = Layout::from_size_align(size, 8).unwrap();
        group.bench_function(BenchmarkId::new("glibc", size), |bench| {
            bench.iter_custom(|n| hot_loop(&SYSTEM, layout, n))
        });
        group.bench_function(BenchmarkId::new("mimalloc", size), |bench| {
            bench.iter_custom(|n| hot_loop(&MIMALLOC, layout, n))
        });
        group.bench_function(BenchmarkId::new("jemalloc", size), |bench| {
            bench.iter_custom(|n| hot_loop(&JEMALLOC, layout, n))
        });
        group.bench_function(BenchmarkId::new("neural", size), |bench| {
            bench.iter_custom(|n| hot_loop(&NEURAL, layout, n))
        });
        group.bench_function(BenchmarkId::new("neural-no-guard", size), |bench| {
            bench.iter_custom(|n| hot_loop(&NEURAL_NO_GUARD, layout, n))
        });
        if size == 56 || size == 1016 {
            group.bench_function(BenchmarkId::new("neural-tracking", size), |bench| {
                bench.iter_custom(|n| hot_loop(&NEURAL_TRACKING, layout, n))
            });
        }
    }
    group.finish();
}

/// The hot loop with compile-time layouts, for each allocator.
fn hot_const(criterion: &mut Criterion) {
    fn sizes<A: GlobalAlloc>(
        group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
        name: &str,
        allocator: &'static A,
    ) {
        group.bench_function(BenchmarkId::new(name, 56), |bench| {
            bench.iter_custom(|n| hot_loop_const::<A, 56>(allocator, n))
        });
        group.bench_function(BenchmarkId::new(name, 248), |bench| {
            bench.iter_custom(|n| hot_loop_const::<A, 248>(allocator, n))
        });
        group.bench_function(BenchmarkId::new(name, 1016), |bench| {
            bench.iter_custom(|n| hot_loop_const::<A, 1016>(allocator, n))
        });
    }
    let mut group = criterion.benchmark_group("hot-const");
    sizes(&mut group, "glibc", &SYSTEM);
    sizes(&mut group, "mimalloc", &MIMALLOC);
    sizes(&mut group, "jemalloc", &JEMALLOC);
    sizes(&mut group, "neural", &NEURAL);
    group.finish();
}

fn batches(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("batch");
    for size in request_sizes() {
        let layout = Layout::from_size_align(size, 8).unwrap();
        group.bench_function(BenchmarkId::new("glibc", size), |bench| {
            bench.iter_custom(|n| batch::<_, false>(&SYSTEM, layout, n))
        });
        group.bench_function(BenchmarkId::new("mimalloc", size), |bench| {
            bench.iter_custom(|n| batch::<_, false>(&MIMALLOC, layout, n))
        });
        group.bench_function(BenchmarkId::new("jemalloc", size), |bench| {
            bench.iter_custom(|n| batch::<_, false>(&JEMALLOC, layout, n))
        });
        group.bench_function(BenchmarkId::new("neural", size), |bench| {
            bench.iter_custom(|n| batch::<_, false>(&NEURAL, layout, n))
        });
        group.bench_function(BenchmarkId::new("neural-no-guard", size), |bench| {
            bench.iter_custom(|n| batch::<_, false>(&NEURAL_NO_GUARD, layout, n))
        });
    }
    group.finish();
    // A caller that fills its blocks: it writes the first and last byte of each, so the
    // lines holding the guard and the free-list link (the block's last word) are the
    // caller's own as well. Against the plain batch, this shows what the allocator's
    // touches of an otherwise untouched block cost.
    let mut group = criterion.benchmark_group("batch-touch");
    for size in request_sizes() {
        let layout = Layout::from_size_align(size, 8).unwrap();
        group.bench_function(BenchmarkId::new("mimalloc", size), |bench| {
            bench.iter_custom(|n| batch::<_, true>(&MIMALLOC, layout, n))
        });
        group.bench_function(BenchmarkId::new("neural", size), |bench| {
            bench.iter_custom(|n| batch::<_, true>(&NEURAL, layout, n))
        });
        group.bench_function(BenchmarkId::new("neural-no-guard", size), |bench| {
            bench.iter_custom(|n| batch::<_, true>(&NEURAL_NO_GUARD, layout, n))
        });
    }
    group.finish();
}

fn two_threads(criterion: &mut Criterion) {
    let mut group = criterion.benchmark_group("cross-thread");
    for size in [56, 1016] {
        let layout = Layout::from_size_align(size, 8).unwrap();
        group.bench_function(BenchmarkId::new("glibc", size), |bench| {
            bench.iter_custom(|n| cross_thread(&SYSTEM, layout, n))
        });
        group.bench_function(BenchmarkId::new("mimalloc", size), |bench| {
            bench.iter_custom(|n| cross_thread(&MIMALLOC, layout, n))
        });
        group.bench_function(BenchmarkId::new("jemalloc", size), |bench| {
            bench.iter_custom(|n| cross_thread(&JEMALLOC, layout, n))
        });
        group.bench_function(BenchmarkId::new("neural", size), |bench| {
            bench.iter_custom(|n| cross_thread(&NEURAL, layout, n))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    // Short runs: the machine is small and shared; pass `--measurement-time` to change.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(20);
    targets = hot, hot_const, batches, two_threads
}
criterion_main!(benches);
