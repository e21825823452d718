//! What the agent knows: the weight tensors it saw placed, the forward passes running,
//! the counters, and the records clients keep in it.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::time::Instant;

use memory_tier::agent::proto::{Access, FileSpan, PassCounters, TensorEntry};

/// A weight tensor the agent saw placed.
#[derive(Debug, Clone)]
pub struct Seen {
    /// The `struct ggml_tensor *` (an address: the server owns it).
    pub tensor: usize,
    /// What a listing says of it.
    pub entry: TensorEntry,
}

/// The registry of weight tensors.
#[derive(Debug, Default)]
pub struct Registry {
    pub seen: Vec<Seen>,
    pub by_name: HashMap<String, usize>,
    by_addr: HashMap<usize, usize>,
}

impl Registry {
    /// Records a placement (a later placement of the same tensor replaces the earlier).
    pub fn record(&mut self, seen: Seen) {
        match self.by_name.get(&seen.entry.name) {
            Some(&i) => {
                self.by_addr.remove(&self.seen[i].tensor);
                self.by_addr.insert(seen.tensor, i);
                self.seen[i] = seen;
            }
            None => {
                self.by_name
                    .insert(seen.entry.name.clone(), self.seen.len());
                self.by_addr.insert(seen.tensor, self.seen.len());
                self.seen.push(seen);
            }
        }
    }

    /// Whether a tensor at this address was recorded.
    pub fn knows(&self, tensor: usize) -> bool {
        self.by_addr.contains_key(&tensor)
    }

    /// Forgets every tensor (their model was freed).
    pub fn clear(&mut self) {
        self.seen.clear();
        self.by_name.clear();
        self.by_addr.clear();
    }

    pub fn get(&self, name: &str) -> Option<&Seen> {
        self.by_name.get(name).map(|&i| &self.seen[i])
    }
}

#[derive(Debug, Default)]
struct GateState {
    in_pass: u32,
    writers_waiting: u32,
    writer_active: bool,
}

/// Keeps writes and forward passes apart: a pass waits while a writer waits or writes,
/// and a writer waits until no pass runs.
#[derive(Debug, Default)]
pub struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
    /// Passes running now, readable without the lock.
    pub running: AtomicU32,
}

thread_local! {
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

impl Gate {
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A pass starts on this thread. A pass inside a pass (an entry point calling
    /// another) does not wait again.
    pub fn enter(&self) {
        let depth = DEPTH.with(|d| {
            let v = d.get();
            d.set(v + 1);
            v
        });
        if depth > 0 {
            return;
        }
        let mut st = self.lock();
        while st.writers_waiting > 0 || st.writer_active {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.in_pass += 1;
        self.running.fetch_add(1, Ordering::SeqCst);
    }

    /// The pass started by the matching [`Gate::enter`] ended.
    pub fn exit(&self) {
        let depth = DEPTH.with(|d| {
            let v = d.get().saturating_sub(1);
            d.set(v);
            v
        });
        if depth > 0 {
            return;
        }
        let mut st = self.lock();
        st.in_pass = st.in_pass.saturating_sub(1);
        self.running.fetch_sub(1, Ordering::SeqCst);
        drop(st);
        self.changed.notify_all();
    }

    /// Waits for a pass boundary and holds passes off until the guard drops.
    pub fn hold(&self) -> Hold<'_> {
        let started = Instant::now();
        let mut st = self.lock();
        st.writers_waiting += 1;
        while st.in_pass > 0 || st.writer_active {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.writers_waiting -= 1;
        st.writer_active = true;
        Hold {
            gate: self,
            waited_us: started.elapsed().as_micros() as u64,
        }
    }
}

/// Passes are held off while this lives.
#[derive(Debug)]
pub struct Hold<'a> {
    gate: &'a Gate,
    /// How long the hold waited for a pass boundary.
    pub waited_us: u64,
}

impl Drop for Hold<'_> {
    fn drop(&mut self) {
        let mut st = self.gate.lock();
        st.writer_active = false;
        drop(st);
        self.gate.changed.notify_all();
    }
}

/// Everything the agent keeps.
#[derive(Debug, Default)]
pub struct Agent {
    pub registry: Mutex<Registry>,
    pub gate: Gate,
    pub contexts: Mutex<Vec<usize>>,
    pub entry_points: Mutex<Vec<&'static str>>,
    pub records: Mutex<Vec<(String, serde_json::Value)>>,
    pub inert: OnceLock<Option<String>>,
    pub passes: AtomicU64,
    pub writes: AtomicU64,
    pub bytes: AtomicU64,
    pub writes_during_pass: AtomicU64,
    pub last_wait_us: AtomicU64,
}

impl Agent {
    pub fn counters(&self) -> PassCounters {
        PassCounters {
            passes: self.passes.load(Ordering::SeqCst),
            writes: self.writes.load(Ordering::SeqCst),
            bytes: self.bytes.load(Ordering::SeqCst),
            writes_during_pass: self.writes_during_pass.load(Ordering::SeqCst),
            last_wait_us: self.last_wait_us.load(Ordering::SeqCst),
        }
    }

    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        self.registry.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn records(&self) -> MutexGuard<'_, Vec<(String, serde_json::Value)>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn contexts(&self) -> Vec<usize> {
        self.contexts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Notes a pass through `entry` on `ctx`.
    pub fn saw_pass(&self, entry: &'static str, ctx: usize) {
        self.passes.fetch_add(1, Ordering::SeqCst);
        let mut points = self.entry_points.lock().unwrap_or_else(|e| e.into_inner());
        if !points.contains(&entry) {
            points.push(entry);
        }
        drop(points);
        let mut contexts = self.contexts.lock().unwrap_or_else(|e| e.into_inner());
        if !contexts.contains(&ctx) {
            contexts.push(ctx);
        }
    }

    pub fn forget_context(&self, ctx: usize) {
        self.contexts
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|&c| c != ctx);
    }

    pub fn entry_points(&self) -> Vec<String> {
        self.entry_points
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|s| (*s).to_owned())
            .collect()
    }
}

/// How a buffer is reached, from what ggml says of it.
pub fn classify(
    is_host: bool,
    device_type: Option<i32>,
    buffer_name: &str,
    file: Option<&crate::maps::FileMapping>,
) -> (Access, Option<FileSpan>) {
    if is_host {
        return match file {
            Some(m) if !m.writable => (
                Access::FileView,
                Some(FileSpan {
                    path: m.path.clone(),
                    offset: m.file_offset,
                }),
            ),
            _ => (Access::Host, None),
        };
    }
    match device_type {
        // A CPU-side buffer that is not host memory in ggml's sense is an "extra" buffer
        // (CPU_REPACK, AMX): it re-packs what it is given, a whole tensor at a time. An
        // unknown device is treated the same way: the safe choice.
        None | Some(crate::ffi::DEVICE_CPU) | Some(crate::ffi::DEVICE_ACCEL) => {
            (Access::WholeTensor, None)
        }
        Some(_) if buffer_name.starts_with("RPC") => (Access::Remote, None),
        Some(_) => (Access::Device, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maps::FileMapping;
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;

    #[test]
    fn buffers_are_classified_by_what_ggml_says() {
        let ro = FileMapping {
            path: "/m.gguf".into(),
            file_offset: 4096,
            writable: false,
        };
        let (a, f) = classify(true, Some(0), "CPU_Mapped", Some(&ro));
        assert_eq!(a, Access::FileView);
        assert_eq!(f.unwrap().offset, 4096);
        assert_eq!(classify(true, Some(0), "CPU", None).0, Access::Host);
        assert_eq!(
            classify(false, Some(0), "CPU_REPACK", None).0,
            Access::WholeTensor
        );
        assert_eq!(classify(false, Some(3), "AMX", None).0, Access::WholeTensor);
        assert_eq!(classify(false, Some(1), "CUDA0", None).0, Access::Device);
        assert_eq!(
            classify(false, Some(1), "RPC0[127.0.0.1:50052]", None).0,
            Access::Remote
        );
        assert_eq!(classify(false, None, "?", None).0, Access::WholeTensor);
    }

    #[test]
    fn a_hold_waits_for_the_running_pass_and_keeps_new_passes_out() {
        let gate = Arc::new(Gate::default());
        gate.enter();
        let held = Arc::new(AtomicBool::new(false));
        let writer = {
            let gate = Arc::clone(&gate);
            let held = Arc::clone(&held);
            std::thread::spawn(move || {
                let hold = gate.hold();
                held.store(true, Ordering::SeqCst);
                // No pass runs while the hold lives.
                assert_eq!(gate.running.load(Ordering::SeqCst), 0);
                std::thread::sleep(std::time::Duration::from_millis(50));
                assert_eq!(gate.running.load(Ordering::SeqCst), 0);
                drop(hold);
            })
        };
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!held.load(Ordering::SeqCst), "the hold began during a pass");
        gate.exit();
        // A pass started now waits for the writer, then runs.
        let pass = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || {
                gate.enter();
                let running = gate.running.load(Ordering::SeqCst);
                gate.exit();
                running
            })
        };
        writer.join().unwrap();
        assert_eq!(pass.join().unwrap(), 1);
        assert!(held.load(Ordering::SeqCst));
    }

    #[test]
    fn a_pass_inside_a_pass_does_not_wait_for_a_waiting_writer() {
        let gate = Arc::new(Gate::default());
        gate.enter();
        let writer = {
            let gate = Arc::clone(&gate);
            std::thread::spawn(move || drop(gate.hold()))
        };
        std::thread::sleep(std::time::Duration::from_millis(30));
        // The writer waits now; a nested entry point must not deadlock on it.
        gate.enter();
        gate.exit();
        gate.exit();
        writer.join().unwrap();
    }
}
