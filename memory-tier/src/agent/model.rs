//! The memory tier over the agent: a [`LiveModel`] of the GGUF file computes every patch
//! (checks, priorities, conflicts, transactions, undo, history), and each change of
//! bytes is carried to the server's copy of its tensor through the agent.
//!
//! Undo comes from the file's bytes, because a repacked buffer cannot be read back: the
//! live model holds the file's bytes with the applied patches over them, and after an
//! apply or a revert the agent is sent the bytes the live model now holds. Without
//! `persist` the live model is a private mapping and the file never changes; the agent
//! keeps a record of each applied patch, so that a later client (another `hotpatch`
//! call) rebuilds the same state before it patches. With `persist` the live model is the
//! shared, journaled mapping of the file, so a restarted server keeps the patches, and
//! tensors the server reads straight from the mapping are reached through the file.

use std::collections::HashMap;
use std::ops::Range;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::client::AgentClient;
use super::plan::{self, Route};
use super::proto::{Hello, PassCounters, TensorEntry, WriteReport, WriteSpec};
use crate::error::{Error, Result};
use crate::live::{
    AppliedPatch, AttachMode, ConflictReport, HistoryEntry, LiveModel, MemoryPatcher, PatchReport,
    Stats,
};
use crate::note::{NotedPatch, from_hex, to_hex};
use crate::patch::MemoryPatch;

/// The record the agent keeps of a memory-only patch.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    patch: NotedPatch,
    /// The bytes it left, in hex, when its transform cannot be described in the note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    written: Option<String>,
}

/// What carrying a change to the server did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Delivery {
    /// Writes the agent carried out.
    pub writes: u64,
    /// Bytes it wrote.
    pub bytes: u64,
    /// Microseconds it waited for a pass boundary.
    pub waited_us: u64,
    /// Tensors reached through the file alone.
    pub through_file: u64,
}

impl Delivery {
    fn add(&mut self, report: &WriteReport) {
        self.writes += report.writes;
        self.bytes += report.bytes;
        self.waited_us += report.waited_us;
    }
}

/// A live model whose patches reach a llama-server's weights through the agent.
#[derive(Debug)]
pub struct AgentModel {
    live: Arc<LiveModel>,
    client: Mutex<AgentClient>,
    hello: Hello,
    entries: HashMap<String, TensorEntry>,
    persist: bool,
    last: Mutex<Delivery>,
}

impl AgentModel {
    /// Attaches to `model` (the GGUF file the server loaded) and to the agent at
    /// `socket`. `persist` also journals every patch into the file.
    pub fn attach(
        model: impl AsRef<Path>,
        socket: impl AsRef<Path>,
        persist: bool,
    ) -> Result<AgentModel> {
        let (mut client, hello) = AgentClient::connect(socket)?;
        if let Some(reason) = &hello.inert {
            return Err(Error::AgentRefused(super::proto::AgentError::new(
                super::proto::AgentErrorKind::Inert,
                reason.clone(),
            )));
        }
        let tensors = client.tensors()?;
        let records = client.records()?;
        let mode = if persist {
            AttachMode::Shared
        } else {
            AttachMode::Private
        };
        let live = LiveModel::attach(model, mode)?;
        let mut entries = HashMap::with_capacity(tensors.len());
        for entry in tensors {
            if let Ok(info) = live.tensor(&entry.name)
                && info.n_bytes != entry.nbytes
            {
                return Err(Error::AgentTensorMismatch {
                    tensor: entry.name,
                    file_bytes: info.n_bytes,
                    server_bytes: entry.nbytes,
                });
            }
            entries.insert(entry.name.clone(), entry);
        }
        if persist && !records.is_empty() {
            return Err(Error::AgentMemoryOnlyPatches {
                count: records.len(),
            });
        }
        // Rebuild the memory-only patches the server holds, oldest first; the server
        // already has their bytes, so the agent is sent nothing.
        for (key, value) in records {
            let record: Record = serde_json::from_value(value).map_err(|e| Error::AgentRecord {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            let written = match &record.written {
                Some(hex) => from_hex(hex).ok_or_else(|| Error::AgentRecord {
                    key: key.clone(),
                    reason: "its bytes are not hex".into(),
                })?,
                None => Vec::new(),
            };
            let patch = record
                .patch
                .to_patch(written)
                .ok_or_else(|| Error::AgentRecord {
                    key: key.clone(),
                    reason: "its id is not a uuid".into(),
                })?;
            live.apply_reported(vec![patch])?;
        }
        Ok(AgentModel {
            live: Arc::new(live),
            client: Mutex::new(client),
            hello,
            entries,
            persist,
            last: Mutex::new(Delivery::default()),
        })
    }

    /// The live model of the file (reads, plans, the applied patches).
    pub fn live(&self) -> &Arc<LiveModel> {
        &self.live
    }

    /// What the agent said when this model attached.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    /// Whether patches are also journaled into the file.
    pub fn persists(&self) -> bool {
        self.persist
    }

    /// The server's copy of each tensor, as the agent saw it placed.
    pub fn entries(&self) -> &HashMap<String, TensorEntry> {
        &self.entries
    }

    /// What the last apply or revert sent to the server.
    pub fn last_delivery(&self) -> Delivery {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn client(&self) -> MutexGuard<'_, AgentClient> {
        self.client.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The pass counters, after waiting for a pass boundary.
    pub fn barrier(&self) -> Result<PassCounters> {
        self.client().barrier()
    }

    /// The tensors a change of `range` touches, each with its data range.
    fn tensors_of(&self, range: &Range<u64>) -> Vec<(String, Range<u64>)> {
        self.live
            .tensors()
            .iter()
            .filter(|t| {
                let r = t.data_range();
                r.start < range.end && range.start < r.end
            })
            .map(|t| (t.name.clone(), t.data_range()))
            .collect()
    }

    /// Checks that every tensor a patch would touch can be reached, before anything moves.
    fn check_reachable(&self, patches: &[MemoryPatch]) -> Result<()> {
        for report in self.live.plan(patches)? {
            for (name, data) in self.tensors_of(&report.range) {
                let entry = self
                    .entries
                    .get(&name)
                    .ok_or(Error::AgentUnseenTensor { tensor: name })?;
                plan::route(
                    entry,
                    &data,
                    std::slice::from_ref(&report.range),
                    self.persist,
                )?;
            }
        }
        Ok(())
    }

    /// Sends the live model's current bytes of `ranges` to the server's copies.
    fn deliver(&self, ranges: &[Range<u64>]) -> Result<Delivery> {
        let mut by_tensor: Vec<(String, Range<u64>, Vec<Range<u64>>)> = Vec::new();
        for range in ranges {
            for (name, data) in self.tensors_of(range) {
                match by_tensor.iter_mut().find(|(n, _, _)| *n == name) {
                    Some((_, _, changed)) => changed.push(range.clone()),
                    None => by_tensor.push((name, data, vec![range.clone()])),
                }
            }
        }
        let mut delivery = Delivery::default();
        let mut writes: Vec<(WriteSpec, Range<u64>)> = Vec::new();
        for (name, data, changed) in &by_tensor {
            let entry = self
                .entries
                .get(name)
                .ok_or_else(|| Error::AgentUnseenTensor {
                    tensor: name.clone(),
                })?;
            match plan::route(entry, data, changed, self.persist)? {
                Route::File => delivery.through_file += 1,
                Route::Agent(local) => {
                    for (spec, r) in plan::specs(name, &local).into_iter().zip(&local) {
                        writes.push((spec, data.start + r.start..data.start + r.end));
                    }
                }
            }
        }
        if !writes.is_empty() {
            let guard = self.live.read();
            let bytes = guard.bytes();
            let batch: Vec<(WriteSpec, &[u8])> = writes
                .iter()
                .map(|(spec, r)| (spec.clone(), &bytes[r.start as usize..r.end as usize]))
                .collect();
            let report = self.client().write(&batch)?;
            delivery.add(&report);
        }
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = delivery;
        Ok(delivery)
    }

    /// Applies patches as one transaction, in the file's model and in the server: all of
    /// them or none.
    pub fn apply_reported(&self, patches: Vec<MemoryPatch>) -> Result<Vec<PatchReport>> {
        self.check_reachable(&patches)?;
        let originals = patches.clone();
        let reports = self.live.apply_reported(patches)?;
        let ranges: Vec<Range<u64>> = reports.iter().map(|r| r.range.clone()).collect();
        if let Err(failed) = self.deliver(&ranges) {
            // The agent reads a whole batch before it writes, so a refused batch wrote
            // nothing; undo the model's side and send its bytes back in case the reply,
            // not the batch, was lost.
            for report in reports.iter().rev() {
                if let Err(e) = self.live.revert(report.id) {
                    return Err(Error::AgentDiverged {
                        patch: report.name.clone(),
                        source: Box::new(e),
                    });
                }
            }
            let _ = self.deliver(&ranges);
            return Err(failed);
        }
        if !self.persist {
            let guard = self.live.read();
            let mut client = self.client();
            for (report, patch) in reports.iter().zip(&originals) {
                let noted = NotedPatch::from_patch(patch, &report.range);
                let written = noted.transform.is_none().then(|| {
                    to_hex(&guard.bytes()[report.range.start as usize..report.range.end as usize])
                });
                let record = Record {
                    patch: noted,
                    written,
                };
                let value = serde_json::to_value(&record).map_err(|e| Error::AgentRecord {
                    key: report.id.to_string(),
                    reason: e.to_string(),
                })?;
                client.put_record(&report.id.to_string(), value)?;
            }
        }
        Ok(reports)
    }

    /// Reverts an applied patch in the file's model and in the server.
    pub fn revert(&self, id: Uuid) -> Result<()> {
        let applied = self
            .live
            .applied_patches()
            .into_iter()
            .find(|a| a.patch.id == id)
            .ok_or_else(|| Error::NoSuchPatch(id.to_string()))?;
        self.live.revert(id)?;
        if let Err(failed) = self.deliver(std::slice::from_ref(&applied.range)) {
            // Put the patch back in the model so both sides still agree.
            let mut patch = applied.patch;
            patch.id = id;
            if let Err(e) = self.live.apply_reported(vec![patch]) {
                return Err(Error::AgentDiverged {
                    patch: id.to_string(),
                    source: Box::new(e),
                });
            }
            return Err(failed);
        }
        if !self.persist {
            self.client().drop_record(&id.to_string())?;
        }
        Ok(())
    }

    /// Reverts the applied patch named `name`.
    pub fn revert_by_name(&self, name: &str) -> Result<()> {
        let id = self
            .live
            .applied_patches()
            .into_iter()
            .find(|a| a.patch.name == name)
            .map(|a| a.patch.id)
            .ok_or_else(|| Error::NoSuchPatch(name.to_owned()))?;
        self.revert(id)
    }

    /// The applied patches.
    pub fn applied_patches(&self) -> Vec<AppliedPatch> {
        self.live.applied_patches()
    }
}

impl MemoryPatcher for AgentModel {
    fn add(&self, patch: MemoryPatch) -> Result<Uuid> {
        self.live.add(patch)
    }

    fn apply(&self, patch: MemoryPatch) -> Result<PatchReport> {
        let mut reports = self.apply_reported(vec![patch])?;
        reports.pop().ok_or(Error::ReadOnly)
    }

    fn apply_transaction(&self, patches: Vec<MemoryPatch>) -> Result<Vec<PatchReport>> {
        self.apply_reported(patches)
    }

    fn revert(&self, id: Uuid) -> Result<()> {
        AgentModel::revert(self, id)
    }

    fn check_conflicts(&self, patch: &MemoryPatch) -> Result<Vec<ConflictReport>> {
        self.live.check_conflicts(patch)
    }

    fn history(&self) -> Vec<HistoryEntry> {
        self.live.history()
    }

    fn stats(&self) -> Stats {
        self.live.stats()
    }
}
