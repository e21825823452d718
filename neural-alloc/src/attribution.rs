//! Who holds the live blocks of a leak report: the program's own code (a leak), or the
//! standard library, which keeps some blocks for the life of the process (the standard
//! streams' buffers, thread-locals and thread handles, lazily made statics).
//!
//! A block allocated through the `GlobalAlloc` adapter carries the return addresses of
//! its allocating call (tracking keeps them); they are resolved to functions and lines
//! with the `backtrace` crate (the binary's symbols and debug line tables) when the
//! report is attributed, never on the allocation path.

use std::collections::HashMap;
use std::fmt;

use crate::inspect::{LeakReport, LeakSite};

/// Why a live block is not a leak of the program's own code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum RuntimeHold {
    /// A buffer of standard output, error or input.
    StandardStream,
    /// A thread-local value or a thread's handle and name.
    ThreadLocal,
    /// A value made once and kept in a static (`OnceLock`, `LazyLock`, `Once`).
    LazyStatic,
    /// Made by the runtime before `main`.
    RuntimeStart,
    /// Allocated before tracking was switched on: in a binary that switches it on first
    /// thing in `main`, the runtime's start-up (program arguments, the main thread).
    BeforeTracking,
}

impl fmt::Display for RuntimeHold {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(match self {
            RuntimeHold::StandardStream => "a standard stream's buffer",
            RuntimeHold::ThreadLocal => "a thread-local or thread handle",
            RuntimeHold::LazyStatic => "a lazily made static",
            RuntimeHold::RuntimeStart => "the runtime's start-up",
            RuntimeHold::BeforeTracking => "allocated before tracking was switched on",
        })
    }
}

/// Where a block was allocated: the first function of the program's own code on the
/// allocating call's stack (or the runtime function, when no program frame was kept).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CallSite {
    /// The function, demangled, without its hash.
    pub function: String,
    /// Its source file, when the binary has line tables.
    pub file: Option<String>,
    /// The line of the call, when the binary has line tables.
    pub line: Option<u32>,
}

impl fmt::Display for CallSite {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.file, self.line) {
            (Some(file), Some(line)) => write!(formatter, "{file}:{line} ({})", self.function),
            _ => formatter.write_str(&self.function),
        }
    }
}

/// Live blocks of one holder and call site.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttributedSite {
    /// `None` for the program's own blocks (leaks), else why the runtime holds them.
    pub hold: Option<RuntimeHold>,
    /// Where they were allocated; `None` when nothing about it was kept (tracking without
    /// return addresses).
    pub call_site: Option<CallSite>,
    /// Live blocks.
    pub blocks: u64,
    /// Requested bytes live.
    pub bytes: u64,
}

/// A leak report split into the program's leaks and the blocks the runtime holds.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Attribution {
    /// Blocks the program's own code allocated and never freed, most bytes first.
    pub leaks: Vec<AttributedSite>,
    /// Blocks the standard library keeps for the life of the process, most bytes first.
    pub runtime: Vec<AttributedSite>,
}

impl Attribution {
    /// Blocks leaked by the program's own code.
    pub fn leaked_blocks(&self) -> u64 {
        self.leaks.iter().map(|site| site.blocks).sum()
    }

    /// Bytes leaked by the program's own code.
    pub fn leaked_bytes(&self) -> u64 {
        self.leaks.iter().map(|site| site.bytes).sum()
    }
}

impl LeakReport {
    /// Splits the live blocks into the program's leaks and the blocks the runtime holds,
    /// each grouped by call site. Blocks from the typed handles and `allocate` carry their
    /// caller's location and are the program's; blocks from the `GlobalAlloc` adapter are
    /// attributed by their return addresses.
    pub fn attribute(&self) -> Attribution {
        let mut groups: HashMap<(Option<RuntimeHold>, Option<CallSite>), (u64, u64)> =
            HashMap::new();
        for site in &self.sites {
            let (hold, call_site) = attribute_site(site);
            let entry = groups.entry((hold, call_site)).or_default();
            entry.0 += site.blocks;
            entry.1 += site.bytes;
        }
        let mut attribution = Attribution::default();
        for ((hold, call_site), (blocks, bytes)) in groups {
            let entry = AttributedSite {
                hold,
                call_site,
                blocks,
                bytes,
            };
            match hold {
                None => attribution.leaks.push(entry),
                Some(_) => attribution.runtime.push(entry),
            }
        }
        for list in [&mut attribution.leaks, &mut attribution.runtime] {
            list.sort_by(|left, right| {
                right
                    .bytes
                    .cmp(&left.bytes)
                    .then_with(|| left.call_site.cmp(&right.call_site))
            });
        }
        attribution
    }
}

fn attribute_site(site: &LeakSite) -> (Option<RuntimeHold>, Option<CallSite>) {
    if let Some(location) = site.site {
        let call_site = CallSite {
            function: "(a typed handle or `allocate`)".to_owned(),
            file: Some(location.file().to_owned()),
            line: Some(location.line()),
        };
        return (None, Some(call_site));
    }
    if !site.tracked {
        return (Some(RuntimeHold::BeforeTracking), None);
    }
    let symbols = resolve(&site.frames);
    if symbols.is_empty() {
        return (None, None);
    }
    // The innermost keeper on the stack holds the block; `std::rt` (which calls `main`)
    // counts only when no frame of the program's own code comes before it.
    let mut seen_program = false;
    let mut hold = None;
    for symbol in &symbols {
        match runtime_hold(&symbol.function) {
            Some(RuntimeHold::RuntimeStart) if seen_program => break,
            Some(found) => {
                hold = Some(found);
                break;
            }
            None => seen_program |= !is_library(&symbol.function),
        }
    }
    let call_site = symbols
        .iter()
        .find(|symbol| !is_library(&symbol.function))
        .or_else(|| {
            symbols
                .iter()
                .find(|symbol| runtime_hold(&symbol.function).is_some())
        })
        .or_else(|| symbols.last())
        .cloned();
    (hold, call_site)
}

/// The functions at `frames` (return addresses, innermost first), inlined ones included,
/// innermost first.
fn resolve(frames: &[usize]) -> Vec<CallSite> {
    let mut symbols = Vec::new();
    for &frame in frames {
        // A return address points after the call; one byte back is inside it.
        let address = frame.saturating_sub(1);
        backtrace::resolve(address as *mut std::ffi::c_void, |symbol| {
            let Some(name) = symbol.name() else {
                return;
            };
            symbols.push(CallSite {
                function: format!("{name:#}"),
                file: symbol.filename().map(|path| path.display().to_string()),
                line: symbol.lineno(),
            });
        });
    }
    symbols
}

/// The crate a demangled function name belongs to: the self type's, or for a generic or
/// primitive self type (`<T as core::ops::FnOnce>::call_once`) the trait's.
fn crate_of(function: &str) -> &str {
    let name = function
        .trim_start_matches(['<', '&', '*'])
        .trim_start_matches("mut ")
        .trim_start_matches("dyn ");
    let (self_path, trait_path) = match name.split_once(" as ") {
        Some((self_path, trait_path)) => (self_path, Some(trait_path)),
        None => (name, None),
    };
    match trait_path {
        Some(trait_path) if !self_path.contains("::") => {
            let trait_path = trait_path.trim_start_matches(['<', '&']);
            trait_path.split("::").next().unwrap_or(trait_path)
        }
        _ => self_path.split("::").next().unwrap_or(self_path),
    }
}

/// Whether a function belongs to the allocator or the standard library (or to glue the
/// compiler makes for the global allocator).
fn is_library(function: &str) -> bool {
    function.starts_with("__rust")
        || function.starts_with("__rdl")
        || function.starts_with("__rg")
        || matches!(
            crate_of(function),
            "std" | "core" | "alloc" | "hashbrown" | "neural_alloc"
        )
}

/// The runtime's reason to hold what a function allocates, when it is one of the standard
/// library's keepers.
fn runtime_hold(function: &str) -> Option<RuntimeHold> {
    if !matches!(crate_of(function), "std" | "core" | "alloc") {
        return None;
    }
    if function.contains("std::io::stdio") {
        Some(RuntimeHold::StandardStream)
    } else if function.contains("thread_local")
        || function.contains("std::thread::local")
        || function.contains("std::thread::current")
        || function.contains("std::thread::Thread")
        || function.contains("std::thread::thread")
    {
        Some(RuntimeHold::ThreadLocal)
    } else if function.contains("once_lock")
        || function.contains("lazy_lock")
        || function.contains("std::sync::once::")
        || function.contains("std::sync::poison::once::")
        || function.contains("std::sys::sync::once")
    {
        Some(RuntimeHold::LazyStatic)
    } else if function.starts_with("std::rt::") {
        Some(RuntimeHold::RuntimeStart)
    } else {
        None
    }
}

impl fmt::Display for Attribution {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let plural = |n: u64| if n == 1 { "" } else { "s" };
        let (blocks, bytes) = (self.leaked_blocks(), self.leaked_bytes());
        writeln!(
            formatter,
            "neural-alloc: {blocks} leak{}, {bytes} bytes (blocks the program allocated and never freed)",
            plural(blocks)
        )?;
        for site in &self.leaks {
            write!(
                formatter,
                "  {} bytes in {} block{} allocated at ",
                site.bytes,
                site.blocks,
                plural(site.blocks)
            )?;
            match &site.call_site {
                Some(call_site) => writeln!(formatter, "{call_site}")?,
                None => writeln!(
                    formatter,
                    "an unknown site (the global allocator, return addresses not kept)"
                )?,
            }
        }
        let held_blocks: u64 = self.runtime.iter().map(|site| site.blocks).sum();
        let held_bytes: u64 = self.runtime.iter().map(|site| site.bytes).sum();
        if held_blocks > 0 {
            writeln!(
                formatter,
                "neural-alloc: {held_blocks} block{}, {held_bytes} bytes held by the runtime for the life of the process (not leaks)",
                plural(held_blocks)
            )?;
        }
        for site in &self.runtime {
            write!(
                formatter,
                "  {} bytes in {} block{}: ",
                site.bytes,
                site.blocks,
                plural(site.blocks)
            )?;
            if let Some(hold) = site.hold {
                write!(formatter, "{hold}")?;
            }
            match &site.call_site {
                Some(call_site) => writeln!(formatter, ", from {call_site}")?,
                None => writeln!(formatter)?,
            }
        }
        Ok(())
    }
}
