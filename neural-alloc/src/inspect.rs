//! Looking at an instance from outside: statistics, the leak report and validation of
//! every live block.

use std::collections::HashMap;
use std::fmt;
use std::panic::Location;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use crate::alloc::{LARGE, POISON_BYTE, Site, guard_intact_racy};
use crate::cache;
use crate::class::{CLASS_COUNT, CLASS_SIZES, GEOMETRY};
use crate::large::LargeHeader;
use crate::report::{CorruptionKind, CorruptionReport};
use crate::slab::{self, word};
use crate::state::{Counters, State, action_of};
use crate::sys;
use crate::track::{self, MAX_FRAMES};

/// Counters of one size class, or of the system-allocator path.
///
/// Threads add their allocation and free counts in batches (once a few thousand have
/// piled up, checked whenever an operation leaves the cache-hit path; at thread exit;
/// and when they read statistics), so figures are exact once other threads are idle or
/// gone, and peaks are sampled at those points.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClassStats {
    /// Block size of the class; 0 for the system-allocator path.
    pub block_size: usize,
    /// Requested bytes live now.
    pub current_bytes: u64,
    /// Highest `current_bytes` seen.
    pub peak_bytes: u64,
    /// Requested bytes ever allocated.
    pub total_bytes: u64,
    /// Allocations live now.
    pub current_count: u64,
    /// Allocations ever made.
    pub total_count: u64,
    /// Allocations served from a thread cache without touching the shared pool.
    pub cache_hits: u64,
    /// Batches moved from the shared pool to a thread cache.
    pub refills: u64,
    /// Batches moved back from a thread cache to the shared pool.
    pub flushes: u64,
    /// Slabs mapped now.
    pub slabs: u64,
    /// Slabs ever mapped.
    pub slabs_created: u64,
    /// Blocks out of the shared pool: live, or waiting in a thread cache.
    pub blocks_outside_pool: u64,
}

impl ClassStats {
    fn read(counters: &Counters, block_size: usize) -> Self {
        let load = |counter: &std::sync::atomic::AtomicU64| counter.load(Ordering::Relaxed);
        let allocations = load(&counters.allocations);
        let frees = load(&counters.frees);
        let allocated = load(&counters.bytes_allocated);
        let freed = load(&counters.bytes_freed);
        ClassStats {
            block_size,
            current_bytes: allocated.saturating_sub(freed),
            peak_bytes: load(&counters.peak_bytes),
            total_bytes: allocated,
            current_count: allocations.saturating_sub(frees),
            total_count: allocations,
            cache_hits: load(&counters.cache_hits),
            refills: load(&counters.refills),
            flushes: load(&counters.flushes),
            slabs: load(&counters.slabs),
            slabs_created: load(&counters.slabs_created),
            blocks_outside_pool: load(&counters.blocks_outside_pool),
        }
    }
}

/// A snapshot of an instance's statistics.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Stats {
    /// One entry per pooled class, smallest first.
    pub classes: [ClassStats; CLASS_COUNT],
    /// Requests served by the system allocator.
    pub large: ClassStats,
    /// Requested bytes live now over all classes.
    pub current_bytes: u64,
    /// Highest `current_bytes` seen.
    pub peak_bytes: u64,
    /// Allocations live now over all classes.
    pub current_count: u64,
    /// Address space reserved for slabs, shared by every instance in the process (0
    /// before the first slab; capped by `HOTPATCH_ALLOC_ARENA_MIB`).
    pub arena_bytes: u64,
    /// Of it, bytes handed out as slabs so far, to any instance (slabs given back to
    /// the system stay counted: they are kept for reuse). Once it reaches
    /// `arena_bytes`, pooled requests go to the system allocator.
    pub arena_used_bytes: u64,
}

impl State {
    pub(crate) fn stats(&self) -> Stats {
        cache::flush_deltas(self, self.slot);
        let mut classes = [ClassStats::default(); CLASS_COUNT];
        for (class, stats) in classes.iter_mut().enumerate() {
            *stats = ClassStats::read(&self.counters[class], CLASS_SIZES[class]);
        }
        let large = ClassStats::read(&self.counters[LARGE], 0);
        let current_bytes =
            classes.iter().map(|class| class.current_bytes).sum::<u64>() + large.current_bytes;
        let current_count =
            classes.iter().map(|class| class.current_count).sum::<u64>() + large.current_count;
        let peak_bytes = u64::try_from(self.peak_live_bytes.load(Ordering::Relaxed))
            .unwrap_or(0)
            .max(current_bytes);
        let (arena_bytes, arena_used_bytes) = slab::arena_usage();
        Stats {
            classes,
            large,
            current_bytes,
            peak_bytes,
            current_count,
            arena_bytes: arena_bytes as u64,
            arena_used_bytes: arena_used_bytes as u64,
        }
    }

    /// Calls `visit(block, word, record)` for every live pooled block, then every live
    /// large block. Pooled blocks are visited without locks; large ones under their
    /// bucket lock, so `visit` must not allocate for those (see `large_blocks`).
    fn live_pooled(&self, mut visit: impl FnMut(NonNull<u8>, u32, Option<&track::TrackRecord>)) {
        for (class, geometry) in GEOMETRY.iter().enumerate() {
            self.walk_slabs(class, |slab_header| {
                for index in 0..geometry.block_count {
                    // SAFETY: the walker keeps the slab mapped; the index is in range.
                    let block_word =
                        unsafe { slab::state_word(slab_header, index) }.load(Ordering::Acquire);
                    if block_word & word::STATE_MASK != word::LIVE {
                        continue;
                    }
                    // SAFETY: as above.
                    let block = unsafe { slab::block_at(slab_header, geometry, index) };
                    // SAFETY: as above.
                    let record = unsafe { track::existing_record(slab_header, index) };
                    visit(
                        block,
                        block_word,
                        record.filter(|_| block_word & word::TRACKED != 0),
                    );
                }
            });
        }
    }

    pub(crate) fn leak_report(&self) -> LeakReport {
        let _inside = cache::enter();
        let mut groups: HashMap<(Site, [usize; MAX_FRAMES], bool), (u64, u64)> = HashMap::new();
        let mut add = |site: Site, frames: [usize; MAX_FRAMES], tracked: bool, size: u64| {
            let entry = groups.entry((site, frames, tracked)).or_insert((0, 0));
            entry.0 += 1;
            entry.1 += size;
        };
        let frames_of = |record: &track::TrackRecord| {
            let mut frames = [0usize; MAX_FRAMES];
            for (slot, frame) in frames.iter_mut().zip(&record.frames) {
                *slot = frame.load(Ordering::Relaxed);
            }
            frames
        };
        self.live_pooled(|_, block_word, record| {
            if block_word & word::INTERNAL != 0 {
                return;
            }
            let size = u64::from(block_word & word::SIZE_MASK);
            match record {
                Some(record) => add(record.alloc_site(), frames_of(record), true, size),
                None => add(None, [0; MAX_FRAMES], false, size),
            }
        });
        for (site, frames, tracked, size) in self.large_blocks() {
            add(site, frames, tracked, size);
        }
        let mut sites: Vec<LeakSite> = groups
            .into_iter()
            .map(|((site, frames, tracked), (blocks, bytes))| LeakSite {
                site,
                frames: frames.into_iter().take_while(|&frame| frame != 0).collect(),
                tracked,
                blocks,
                bytes,
            })
            .collect();
        sites.sort_by(|left, right| {
            right
                .bytes
                .cmp(&left.bytes)
                .then(left.blocks.cmp(&right.blocks))
        });
        LeakReport {
            blocks: sites.iter().map(|site| site.blocks).sum(),
            bytes: sites.iter().map(|site| site.bytes).sum(),
            sites,
        }
    }

    /// Site, frames, tracked flag and size of every live large block that was not
    /// allocated by the allocator itself.
    fn large_blocks(&self) -> Vec<(Site, [usize; MAX_FRAMES], bool, u64)> {
        // Collected under bucket locks, so reserve first and never grow meanwhile: a
        // growing Vec could allocate a large block from this very instance.
        let mut count = 0usize;
        self.large.for_each(|_| count += 1);
        let mut found = Vec::with_capacity(count + 16);
        self.large.for_each(|header| {
            if found.len() == found.capacity() {
                return;
            }
            // SAFETY: the bucket lock is held, so the header is live.
            let header = unsafe { &*header.as_ptr() };
            let header_word = header.word.load(Ordering::Relaxed);
            if header_word & word::INTERNAL != 0 {
                return;
            }
            let tracked = header_word & word::TRACKED != 0;
            let mut frames = [0usize; MAX_FRAMES];
            if tracked {
                for (slot, frame) in frames.iter_mut().zip(&header.record.frames) {
                    *slot = frame.load(Ordering::Relaxed);
                }
            }
            let site = if tracked {
                header.record.alloc_site()
            } else {
                None
            };
            found.push((site, frames, tracked, header.size as u64));
        });
        found
    }

    pub(crate) fn validate_all(&self, detected_at: Site) -> Validation {
        let action = action_of(self.flags.load(Ordering::Relaxed));
        let poison_checks = self.flags.load(Ordering::Relaxed) & crate::state::flag::POISON != 0;
        let mut blocks_checked = 0u64;
        let mut problems = 0u64;
        let mut file = |kind, address: usize, record: Option<&track::TrackRecord>, size| {
            problems += 1;
            self.reports.file(
                CorruptionReport {
                    kind,
                    address,
                    size,
                    allocated_at: record.and_then(track::TrackRecord::alloc_site),
                    freed_at: record.and_then(track::TrackRecord::free_site),
                    detected_at,
                },
                action,
            );
        };
        for (class, geometry) in GEOMETRY.iter().enumerate() {
            self.walk_slabs(class, |slab_header| {
                for index in 0..geometry.block_count {
                    // SAFETY: the walker keeps the slab mapped; the index is in range.
                    let state_word = unsafe { slab::state_word(slab_header, index) };
                    let before = state_word.load(Ordering::Acquire);
                    // SAFETY: as above.
                    let block = unsafe { slab::block_at(slab_header, geometry, index) };
                    let size = (before & word::SIZE_MASK) as usize;
                    let problem = match before & word::STATE_MASK {
                        word::LIVE if before & word::GUARDED != 0 => {
                            blocks_checked += 1;
                            // SAFETY: the guard lies inside the block, which stays mapped.
                            (!unsafe { guard_intact_racy(block, size) })
                                .then_some(CorruptionKind::GuardOverwritten)
                        }
                        word::FREE if before & word::POISONED != 0 && poison_checks => {
                            blocks_checked += 1;
                            let intact = (0..geometry.link).all(|offset| {
                                // SAFETY: inside the block, which stays mapped; see
                                // `guard_intact_racy` for why the read is volatile.
                                unsafe { block.add(offset).as_ptr().read_volatile() == POISON_BYTE }
                            });
                            (!intact).then_some(CorruptionKind::UseAfterFree)
                        }
                        _ => None,
                    };
                    // A changed state word means the block changed hands while we read
                    // it: the bytes belong to a new owner, so the finding is void.
                    if let Some(kind) = problem
                        && state_word.load(Ordering::Acquire) == before
                    {
                        // SAFETY: as above.
                        let record = unsafe { track::existing_record(slab_header, index) }
                            .filter(|_| before & word::TRACKED != 0);
                        file(kind, block.as_ptr().addr(), record, Some(size));
                    }
                }
            });
        }
        self.large.for_each(|header| {
            let block = LargeHeader::user_pointer(header);
            // SAFETY: the bucket lock is held, so the block cannot be freed meanwhile.
            let header = unsafe { &*header.as_ptr() };
            let header_word = header.word.load(Ordering::Relaxed);
            if header_word & word::GUARDED == 0 {
                return;
            }
            blocks_checked += 1;
            // SAFETY: the allocation holds `size + GUARD_LEN` bytes after the header.
            if !unsafe { guard_intact_racy(block, header.size) } {
                let record = Some(&header.record).filter(|_| header_word & word::TRACKED != 0);
                file(
                    CorruptionKind::GuardOverwritten,
                    block.as_ptr().addr(),
                    record,
                    Some(header.size),
                );
            }
        });
        Validation {
            blocks_checked,
            problems,
        }
    }
}

/// Outcome of [`crate::NeuralAlloc::validate_all`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Validation {
    /// Live blocks whose guard was checked plus free blocks whose poison was checked.
    pub blocks_checked: u64,
    /// Problems found; each was also reported with the configured action.
    pub problems: u64,
}

/// Live blocks grouped by allocation site.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeakReport {
    /// Live blocks in total.
    pub blocks: u64,
    /// Requested bytes live in total.
    pub bytes: u64,
    /// One entry per allocation site, most bytes first.
    pub sites: Vec<LeakSite>,
}

/// Live blocks of one allocation site.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeakSite {
    /// Where they were allocated; `None` for untracked blocks and for blocks from the
    /// `GlobalAlloc` adapter (grouped by `frames` instead when backtraces are on).
    pub site: Option<&'static Location<'static>>,
    /// Return addresses of the allocating call, innermost first, when captured.
    pub frames: Vec<usize>,
    /// Whether these blocks were allocated with tracking on.
    pub tracked: bool,
    /// Number of live blocks.
    pub blocks: u64,
    /// Requested bytes live.
    pub bytes: u64,
}

impl LeakReport {
    /// The entry of a given allocation site, if any block from there is live.
    pub fn at(&self, site: &Location<'_>) -> Option<&LeakSite> {
        self.sites.iter().find(|entry| {
            entry.site.is_some_and(|known| {
                known.file() == site.file()
                    && known.line() == site.line()
                    && known.column() == site.column()
            })
        })
    }
}

impl fmt::Display for LeakReport {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            formatter,
            "neural-alloc: {} live blocks, {} bytes",
            self.blocks, self.bytes
        )?;
        for entry in &self.sites {
            write!(
                formatter,
                "  {} bytes in {} blocks ",
                entry.bytes, entry.blocks
            )?;
            match (entry.site, entry.tracked) {
                (Some(site), _) => writeln!(formatter, "allocated at {site}")?,
                (None, true) => writeln!(formatter, "allocated through the global allocator")?,
                (None, false) => writeln!(formatter, "allocated while tracking was off")?,
            }
            for &frame in &entry.frames {
                match sys::module_of(frame) {
                    Some((module, base)) => {
                        writeln!(formatter, "      {module} +{:#x}", frame - base)?
                    }
                    None => writeln!(formatter, "      {frame:#x}")?,
                }
            }
        }
        Ok(())
    }
}
