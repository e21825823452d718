//! Ratios that hold on a shared machine: every trial runs each allocator once, one right
//! after the other, so a slow spell of the machine lands on all of them alike. For each
//! pattern and request size it prints the fastest trial of each allocator (ns per
//! allocate/free pair) and, for each ratio, the median over trials of that trial's
//! ratio.
//!
//! Patterns: the hot loop, the batch (allocate 1,000, free them in order), and the batch
//! with the first and last byte of each block written. Ours runs with tracking off and
//! guards on (`neural`), and without guards (`no-guard`) for the guard cost.
//!
//! Run: `cargo bench -p neural-alloc --bench compare` (under a minute).

mod patterns;

use std::alloc::{GlobalAlloc, Layout};
use std::time::Duration;

use patterns::{
    BATCH, JEMALLOC, MIMALLOC, NEURAL, NEURAL_NO_GUARD, SYSTEM, batch, hot_loop, request_sizes,
};

/// Trials per pattern and size; odd, so the median is one trial's figure.
const TRIALS: usize = 41;
/// Allocate/free pairs per allocator per trial.
const PAIRS: u64 = 50_000;

/// The patterns, in the order they are printed.
#[derive(Clone, Copy)]
enum Pattern {
    Hot,
    Batch,
    BatchTouch,
}

const PATTERNS: [(Pattern, &str); 3] = [
    (Pattern::Hot, "hot"),
    (Pattern::Batch, "batch"),
    (Pattern::BatchTouch, "batch-touch"),
];

const NAMES: [&str; 5] = ["glibc", "mimalloc", "jemalloc", "neural", "no-guard"];
const GLIBC: usize = 0;
const MI: usize = 1;
const JE: usize = 2;
const OURS: usize = 3;
const NO_GUARD: usize = 4;

/// Rounds of the batch pattern that make `PAIRS` pairs; `batch` reports per pair of a
/// round, so `PAIRS` pairs take its result times `BATCH`.
const ROUNDS: u64 = PAIRS / BATCH as u64;

/// Runs `PAIRS` pairs of `pattern` with `layout` on `allocator` and returns the time
/// they took. The pattern is chosen outside the loops, which each arm inlines.
fn run<A: GlobalAlloc>(allocator: &A, pattern: Pattern, layout: Layout) -> Duration {
    match pattern {
        Pattern::Hot => hot_loop(allocator, layout, PAIRS),
        Pattern::Batch => batch::<_, false>(allocator, layout, ROUNDS) * BATCH as u32,
        Pattern::BatchTouch => batch::<_, true>(allocator, layout, ROUNDS) * BATCH as u32,
    }
}

/// A run of each allocator, in the order of `NAMES`.
const RUNS: [fn(Pattern, Layout) -> Duration; 5] = [
    |pattern, layout| run(&SYSTEM, pattern, layout),
    |pattern, layout| run(&MIMALLOC, pattern, layout),
    |pattern, layout| run(&JEMALLOC, pattern, layout),
    |pattern, layout| run(&NEURAL, pattern, layout),
    |pattern, layout| run(&NEURAL_NO_GUARD, pattern, layout),
];

/// The middle value of `values` (sorted in place).
fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn main() {
    // `cargo bench` passes `--bench`; there is nothing to choose.
    println!(
        "ns per pair: fastest of {TRIALS} trials of {PAIRS} pairs; ratios: median of the \
         trials' own ratios\n"
    );
    for (pattern, name) in PATTERNS {
        println!("## {name}\n");
        println!(
            "| request | {} | ours/jemalloc | ours/mimalloc | glibc/ours | guard cost |",
            NAMES.join(" | ")
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for size in request_sizes() {
            let layout = Layout::from_size_align(size, 8).unwrap();
            for run in RUNS {
                run(pattern, layout);
            }
            // ns per pair, per allocator, per trial.
            let mut figures = vec![[0.0f64; 5]; TRIALS];
            for (trial, row) in figures.iter_mut().enumerate() {
                // A different allocator goes first in each trial.
                for step in 0..NAMES.len() {
                    let which = (trial + step) % NAMES.len();
                    row[which] = RUNS[which](pattern, layout).as_nanos() as f64 / PAIRS as f64;
                }
            }
            let fastest: Vec<f64> = (0..NAMES.len())
                .map(|which| {
                    figures
                        .iter()
                        .map(|row| row[which])
                        .fold(f64::INFINITY, f64::min)
                })
                .collect();
            let ratio = |top: usize, bottom: usize| {
                let mut ratios: Vec<f64> =
                    figures.iter().map(|row| row[top] / row[bottom]).collect();
                median(&mut ratios)
            };
            let cells: Vec<String> = fastest.iter().map(|ns| format!("{ns:.2}")).collect();
            println!(
                "| {size} | {} | {:.2} | {:.2} | {:.2} | {:+.0}% |",
                cells.join(" | "),
                ratio(OURS, JE),
                ratio(OURS, MI),
                ratio(GLIBC, OURS),
                (ratio(OURS, NO_GUARD) - 1.0) * 100.0
            );
        }
        println!();
    }
}
