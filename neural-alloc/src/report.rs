//! Corruption reports: what was found, where the block came from, and what to do about
//! it (abort, log, or only count).

use std::fmt::{self, Write as _};
use std::panic::Location;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sys;

/// What kind of misuse or damage was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CorruptionKind {
    /// A block was freed while already free.
    DoubleFree,
    /// A pointer that is not the start of a live block of this allocator was freed: it
    /// lies outside every slab, inside a block, in a slab of another instance, or names
    /// a large block that does not exist (any more).
    InvalidFree,
    /// The guard bytes after a block were overwritten: the owner wrote past its end.
    GuardOverwritten,
    /// The poison pattern of a free block was changed: someone wrote after freeing it.
    UseAfterFree,
}

impl CorruptionKind {
    fn index(self) -> usize {
        match self {
            Self::DoubleFree => 0,
            Self::InvalidFree => 1,
            Self::GuardOverwritten => 2,
            Self::UseAfterFree => 3,
        }
    }
}

impl fmt::Display for CorruptionKind {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            Self::DoubleFree => "double free",
            Self::InvalidFree => "invalid free",
            Self::GuardOverwritten => "guard bytes overwritten",
            Self::UseAfterFree => "write after free",
        })
    }
}

/// What the allocator does when it finds corruption.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CorruptionAction {
    /// Write the report to standard error, then abort the process.
    #[default]
    Abort,
    /// Write the report to standard error and carry on.
    Log,
    /// Only count it and keep it for [`crate::NeuralAlloc::corruption_reports`].
    Count,
}

/// One finding, with the call sites known for the block.
///
/// Call sites are known for blocks allocated with tracking on through the typed or raw
/// API; blocks from the `GlobalAlloc` adapter have no call site (their backtrace, when
/// captured, appears in leak reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CorruptionReport {
    /// What was found.
    pub kind: CorruptionKind,
    /// The address passed by the caller or of the damaged block.
    pub address: usize,
    /// Requested size of the block, when known.
    pub size: Option<usize>,
    /// Where the block was allocated, when tracked.
    pub allocated_at: Option<&'static Location<'static>>,
    /// Where the block was last freed, when tracked and freed.
    pub freed_at: Option<&'static Location<'static>>,
    /// The call that found the problem (the free, allocation or validation call).
    pub detected_at: Option<&'static Location<'static>>,
}

impl fmt::Display for CorruptionReport {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "neural-alloc: {} at {:#x}",
            self.kind, self.address
        )?;
        if let Some(size) = self.size {
            write!(formatter, " ({size} bytes)")?;
        }
        let sites = [
            ("allocated at", self.allocated_at),
            ("freed at", self.freed_at),
            ("detected at", self.detected_at),
        ];
        for (label, site) in sites {
            match site {
                Some(location) => write!(formatter, "; {label} {location}")?,
                None => write!(formatter, "; {label} unknown")?,
            }
        }
        Ok(())
    }
}

/// Reports kept for inspection; older ones are dropped.
pub const KEPT_REPORTS: usize = 64;

/// Counts per kind and the most recent reports.
pub(crate) struct ReportLog {
    counts: [AtomicU64; 4],
    kept: Mutex<KeptReports>,
}

struct KeptReports {
    reports: [Option<CorruptionReport>; KEPT_REPORTS],
    next: usize,
}

/// How many findings of each kind there have been.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CorruptionCounts {
    /// [`CorruptionKind::DoubleFree`] findings.
    pub double_frees: u64,
    /// [`CorruptionKind::InvalidFree`] findings.
    pub invalid_frees: u64,
    /// [`CorruptionKind::GuardOverwritten`] findings.
    pub guard_overwrites: u64,
    /// [`CorruptionKind::UseAfterFree`] findings.
    pub uses_after_free: u64,
}

impl CorruptionCounts {
    /// Sum of all kinds.
    pub fn total(&self) -> u64 {
        self.double_frees + self.invalid_frees + self.guard_overwrites + self.uses_after_free
    }
}

impl ReportLog {
    pub(crate) const fn new() -> Self {
        Self {
            counts: [const { AtomicU64::new(0) }; 4],
            kept: Mutex::new(KeptReports {
                reports: [None; KEPT_REPORTS],
                next: 0,
            }),
        }
    }

    /// Files a report and carries out `action`. Never allocates.
    pub(crate) fn file(&self, report: CorruptionReport, action: CorruptionAction) {
        self.counts[report.kind.index()].fetch_add(1, Ordering::Relaxed);
        {
            let mut kept = self
                .kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let slot = kept.next % KEPT_REPORTS;
            kept.reports[slot] = Some(report);
            kept.next = kept.next.wrapping_add(1);
        }
        if action != CorruptionAction::Count {
            let mut line = StackText::new();
            let _ = writeln!(line, "{report}");
            sys::write_stderr(line.as_bytes());
        }
        if action == CorruptionAction::Abort {
            std::process::abort();
        }
    }

    pub(crate) fn counts(&self) -> CorruptionCounts {
        let count = |kind: CorruptionKind| self.counts[kind.index()].load(Ordering::Relaxed);
        CorruptionCounts {
            double_frees: count(CorruptionKind::DoubleFree),
            invalid_frees: count(CorruptionKind::InvalidFree),
            guard_overwrites: count(CorruptionKind::GuardOverwritten),
            uses_after_free: count(CorruptionKind::UseAfterFree),
        }
    }

    /// Kept reports, oldest first.
    pub(crate) fn reports(&self) -> Vec<CorruptionReport> {
        // Copied out under the lock into a stack array and only then into a Vec: the
        // Vec may allocate from this allocator, which may need to file a report.
        let (copy, next) = {
            let kept = self
                .kept
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            (kept.reports, kept.next)
        };
        (0..KEPT_REPORTS)
            .filter_map(|step| copy[(next + step) % KEPT_REPORTS])
            .collect()
    }

    pub(crate) fn clear(&self) {
        for count in &self.counts {
            count.store(0, Ordering::Relaxed);
        }
        let mut kept = self
            .kept
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        kept.reports = [None; KEPT_REPORTS];
        kept.next = 0;
    }
}

/// A fixed buffer that formats text without allocating; overlong text is cut.
pub(crate) struct StackText {
    bytes: [u8; 1024],
    len: usize,
}

impl StackText {
    pub(crate) const fn new() -> Self {
        Self {
            bytes: [0; 1024],
            len: 0,
        }
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

impl fmt::Write for StackText {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        let room = self.bytes.len() - self.len;
        let taken = text.len().min(room);
        self.bytes[self.len..self.len + taken].copy_from_slice(&text.as_bytes()[..taken]);
        self.len += taken;
        Ok(())
    }
}
