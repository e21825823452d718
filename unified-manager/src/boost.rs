//! The `boost` pipeline: warm the model's pages into the page cache, optionally lock
//! them in memory and advise huge pages, and turn the attached server's response cache
//! on; the report gives the time of a first full read before and after. A shard of a
//! set stands for its whole set: every shard is warmed, advised and locked.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use byte_tier::{MappedFile, evict_from_page_cache};

use crate::error::{Error, Result};
use crate::manager::Manager;
use crate::report::{PipelineReport, StepOutcome, Tier};

/// What the boost pipeline does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BoostOptions {
    /// Drop the file's pages from the page cache first and time a cold full read, to
    /// compare with the read after the boost. Off for a file a busy server is using.
    pub measure_cold: bool,
    /// Lock the pages in memory (`mlock`); held until the boost is released.
    pub mlock: bool,
    /// Advise transparent huge pages over the mapping.
    pub huge_pages: bool,
    /// Turn the attached server's response cache on.
    pub server_cache: bool,
    /// Plan and report, change nothing.
    pub dry_run: bool,
}

/// A boost the manager holds: the mappings (one per file of the model) that carry the
/// advice and the page lock.
#[derive(Debug)]
pub(crate) struct HeldBoost {
    id: u32,
    maps: Vec<MappedFile>,
    locked: bool,
}

static NEXT_BOOST: AtomicU32 = AtomicU32::new(1);

/// Reads one byte of every page of fresh mappings of `paths`; returns the seconds it
/// took (every page fault of a first reader, as a server loading the model sees them).
fn time_full_read(paths: &[PathBuf]) -> Result<f64> {
    let maps = paths
        .iter()
        .map(MappedFile::open)
        .collect::<byte_tier::Result<Vec<_>>>()?;
    let page = memory_tier::page_size();
    let started = Instant::now();
    let mut sum = 0u8;
    for map in &maps {
        for byte in map.bytes().iter().step_by(page) {
            sum = sum.wrapping_add(*byte);
        }
    }
    std::hint::black_box(sum);
    Ok(started.elapsed().as_secs_f64())
}

/// The files of the model at `path`: every shard of its set when it is one shard of
/// several (the set checked), else the file itself.
fn model_files(path: &Path) -> Result<Vec<PathBuf>> {
    Ok(match byte_tier::split::open_set_of(path)? {
        Some(set) => set.files().iter().map(|f| f.path().to_owned()).collect(),
        None => vec![path.to_owned()],
    })
}

fn evict_all(paths: &[PathBuf]) -> Result<()> {
    for path in paths {
        evict_from_page_cache(path)?;
    }
    Ok(())
}

fn rate(bytes: u64, seconds: f64) -> String {
    format!("{:.0} MB/s", bytes as f64 / seconds.max(1e-9) / 1e6)
}

/// The kernel's transparent-huge-page mode (`always`, `madvise` or `never`).
fn thp_mode() -> Option<String> {
    let text = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").ok()?;
    let start = text.find('[')?;
    let end = text[start..].find(']')?;
    Some(text[start + 1..start + end].to_owned())
}

impl Manager {
    /// Runs the boost pipeline on the file at `path`. The boost (advice and page lock)
    /// is held by the manager until [`Manager::release_boost`] or
    /// [`Manager::revert_pipeline`]; a refused page lock fails the run and undoes it.
    pub fn boost(&self, path: &Path, options: &BoostOptions) -> Result<PipelineReport> {
        let files = model_files(path)?;
        let mut len = 0u64;
        for file in &files {
            len += std::fs::metadata(file)
                .map_err(|e| Error::io("stat", file, e))?
                .len();
        }
        let mut report = PipelineReport::new("boost", path.to_owned(), options.dry_run);
        let started = Instant::now();
        let cold = if options.measure_cold && !options.dry_run {
            evict_all(&files)?;
            let seconds = time_full_read(&files)?;
            report.push(
                "cold_read",
                Tier::Os,
                started,
                StepOutcome::ok(
                    format!(
                        "first full read from a dropped cache: {:.1} ms ({})",
                        seconds * 1e3,
                        rate(len, seconds)
                    ),
                    len,
                ),
            );
            // The timing read warmed the cache: drop it again so the boost starts cold.
            evict_all(&files)?;
            Some(seconds)
        } else {
            report.push(
                "cold_read",
                Tier::Os,
                started,
                StepOutcome::skipped(if options.dry_run {
                    "dry run"
                } else {
                    "not asked for"
                }),
            );
            None
        };
        if options.dry_run {
            for step in ["will_need", "huge_pages", "mlock", "warm_read"] {
                report.push(
                    step,
                    Tier::Os,
                    Instant::now(),
                    StepOutcome::skipped("dry run"),
                );
            }
            report.push(
                "server_cache",
                Tier::Server,
                Instant::now(),
                StepOutcome::skipped("dry run"),
            );
            return Ok(report);
        }

        let started = Instant::now();
        let maps = files
            .iter()
            .map(MappedFile::open)
            .collect::<byte_tier::Result<Vec<_>>>()?;
        for map in &maps {
            map.advise_will_need()?;
        }
        let of_files = if maps.len() > 1 {
            format!(" in {} shards", maps.len())
        } else {
            String::new()
        };
        report.push(
            "will_need",
            Tier::Os,
            started,
            StepOutcome::ok(
                format!("asked the kernel to read {len} bytes ahead{of_files}"),
                len,
            ),
        );

        let started = Instant::now();
        let outcome = if !options.huge_pages {
            StepOutcome::skipped("not asked for")
        } else {
            let mode = thp_mode().unwrap_or_else(|| "unknown".to_owned());
            match maps.iter().try_for_each(MappedFile::advise_huge_pages) {
                Ok(()) => StepOutcome::ok(
                    format!(
                        "advised (kernel THP mode: {mode}; a file mapping gets huge pages only where the kernel supports read-only file THP)"
                    ),
                    0,
                ),
                Err(error) => StepOutcome::skipped(format!(
                    "the kernel refused the advice (THP mode {mode}): {error}"
                )),
            }
        };
        report.push("huge_pages", Tier::Os, started, outcome);

        let started = Instant::now();
        let mut locked = false;
        let outcome = if !options.mlock {
            StepOutcome::skipped("not asked for")
        } else {
            // Unmapping unlocks: a refusal part way drops every mapping below.
            match maps.iter().try_for_each(MappedFile::lock_resident) {
                Ok(()) => {
                    locked = true;
                    StepOutcome::ok(format!("{len} bytes locked in memory{of_files}"), len)
                }
                Err(error) => StepOutcome::failed("nothing locked", error.to_string()),
            }
        };
        report.push("mlock", Tier::Os, started, outcome);
        if !report.succeeded() {
            drop(maps);
            return Ok(report);
        }

        let started = Instant::now();
        let seconds = time_full_read(&files)?;
        report.push(
            "warm_read",
            Tier::Os,
            started,
            StepOutcome::ok(
                format!(
                    "first full read after the boost: {:.1} ms ({}){}",
                    seconds * 1e3,
                    rate(len, seconds),
                    cold.map_or(String::new(), |c| format!(
                        ", {:.1}x the cold read's speed",
                        c / seconds.max(1e-9)
                    ))
                ),
                len,
            ),
        );

        let id = NEXT_BOOST.fetch_add(1, Ordering::Relaxed);
        self.boosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(HeldBoost { id, maps, locked });
        report.undo.boost = Some(id);

        let started = Instant::now();
        let outcome = match (self.server(), options.server_cache) {
            (_, false) => StepOutcome::skipped("not asked for"),
            (None, true) => StepOutcome::skipped("no server attached"),
            (Some(server), true) => match server
                .cache_enabled()
                .and_then(|before| server.set_cache_enabled(true).map(|()| before))
            {
                Ok(before) => {
                    if !before {
                        report.undo.server_cache_before = Some(false);
                    }
                    StepOutcome::ok(
                        if before {
                            "the response cache was on already"
                        } else {
                            "response cache turned on"
                        },
                        0,
                    )
                }
                Err(error) => StepOutcome::failed("cache unchanged", error.to_string()),
            },
        };
        report.push("server_cache", Tier::Server, started, outcome);
        if !report.succeeded() {
            self.release_boost(id)?;
            report.undo.boost = None;
            return Ok(report);
        }
        self.completed(&report);
        Ok(report)
    }

    /// Releases a boost: unlocks its pages and returns the mapping to default advice.
    pub fn release_boost(&self, id: u32) -> Result<()> {
        let held = {
            let mut boosts = self.boosts.lock().unwrap_or_else(|e| e.into_inner());
            let index = boosts
                .iter()
                .position(|b| b.id == id)
                .ok_or_else(|| Error::Refused(format!("no boost #{id} is held")))?;
            boosts.remove(index)
        };
        for map in &held.maps {
            if held.locked {
                map.unlock()?;
            }
            map.advise_normal()?;
        }
        Ok(())
    }

    /// The files boosted now, with the boost that holds each (every shard of a set).
    pub fn boosted(&self) -> Vec<(u32, PathBuf)> {
        self.boosts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .flat_map(|b| b.maps.iter().map(|m| (b.id, m.path().to_owned())))
            .collect()
    }
}
