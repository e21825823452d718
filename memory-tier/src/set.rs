//! A model stored as a shard set, attached live as llama-server maps it when it loads
//! the set from its first shard: every shard. Each shard is its own [`LiveModel`] (its
//! own mapping, journal, patches and history); a patch goes to the shard that holds its
//! tensor, so everything a [`LiveModel`] guarantees for a transaction holds within that
//! shard. A transaction is one shard's: patches that would span shards are refused
//! (byte-tier's set transactions write across shards through the files).

use std::path::Path;
use std::sync::Arc;

use uuid::Uuid;

use crate::error::{Error, Result};
use crate::live::{AppliedPatch, AttachMode, HistoryEntry, LiveModel, PatchReport, Stats};
use crate::patch::{MemoryPatch, PatchTarget};

/// Every file of a model, each attached live: one file, or every shard of a set.
#[derive(Debug)]
pub struct LiveSet {
    files: Vec<Arc<LiveModel>>,
}

impl LiveSet {
    /// Attaches `path`, or, when it is one shard of several, every shard of its set (the
    /// set checked first: a missing, duplicated or foreign shard is an error naming it).
    pub fn attach(path: &Path, mode: AttachMode) -> Result<LiveSet> {
        let paths = match byte_tier::split::open_set_of(path)? {
            Some(set) => set.files().iter().map(|f| f.path().to_owned()).collect(),
            None => vec![path.to_owned()],
        };
        let files = paths
            .iter()
            .map(|p| LiveModel::attach(p, mode).map(Arc::new))
            .collect::<Result<Vec<_>>>()?;
        Ok(LiveSet { files })
    }

    /// One model attached elsewhere, as a set of one.
    pub fn of(model: Arc<LiveModel>) -> LiveSet {
        LiveSet { files: vec![model] }
    }

    /// Every file, in set order.
    pub fn files(&self) -> &[Arc<LiveModel>] {
        &self.files
    }

    /// The model when it is one file.
    pub fn single(&self) -> Option<&Arc<LiveModel>> {
        match self.files.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// The file a server loads the model from (the first shard of a set).
    pub fn first(&self) -> &Arc<LiveModel> {
        &self.files[0]
    }

    /// The file that holds tensor `name`.
    pub fn holder(&self, name: &str) -> Result<&Arc<LiveModel>> {
        self.files
            .iter()
            .find(|f| f.tensor(name).is_ok())
            .ok_or_else(|| Error::NoSuchTensor(name.to_owned()))
    }

    /// The file that holds the applied patch `id`.
    pub fn holder_of_patch(&self, id: Uuid) -> Result<&Arc<LiveModel>> {
        self.files
            .iter()
            .find(|f| f.applied().iter().any(|(applied, _)| *applied == id))
            .ok_or_else(|| Error::NoSuchPatch(id.to_string()))
    }

    /// Applies `patches` as one transaction of the file that holds their tensors.
    /// Refused before anything is written: patches in different shards, and, for a
    /// set, a patch addressed by a byte range (which names no shard).
    pub fn apply_reported(&self, patches: Vec<MemoryPatch>) -> Result<Vec<PatchReport>> {
        let mut holder: Option<&Arc<LiveModel>> = None;
        for patch in &patches {
            let file = match (&patch.target, self.single()) {
                (_, Some(one)) => one,
                (PatchTarget::Tensor { name, .. }, None) => self.holder(name)?,
                (PatchTarget::Raw(_), None) => {
                    return Err(Error::InvalidPatch {
                        patch: patch.name.clone(),
                        reason: "a byte range names no shard of a set: target a tensor".into(),
                    });
                }
            };
            match holder {
                Some(h) if !Arc::ptr_eq(h, file) => {
                    return Err(Error::InvalidPatch {
                        patch: patch.name.clone(),
                        reason: "its tensor is in another shard than the transaction's first \
                                 patch: a live transaction is one shard's"
                            .into(),
                    });
                }
                _ => holder = Some(file),
            }
        }
        match holder {
            Some(file) => file.apply_reported(patches),
            None => Ok(Vec::new()),
        }
    }

    /// Reverts the applied patch `id`, in the file that holds it.
    pub fn revert(&self, id: Uuid) -> Result<()> {
        self.holder_of_patch(id)?.revert(id)
    }

    /// The applied patches of every file (id, name), oldest first within each file.
    pub fn applied(&self) -> Vec<(Uuid, String)> {
        self.files.iter().flat_map(|f| f.applied()).collect()
    }

    /// The applied patches of every file, each with its file's place in the set.
    pub fn applied_patches(&self) -> Vec<(usize, AppliedPatch)> {
        self.files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| f.applied_patches().into_iter().map(move |a| (i, a)))
            .collect()
    }

    /// The history of every file, in time order.
    pub fn history(&self) -> Vec<HistoryEntry> {
        let mut all: Vec<HistoryEntry> = self.files.iter().flat_map(|f| f.history()).collect();
        all.sort_by_key(|h| h.at);
        all
    }

    /// The counters of every file, summed.
    pub fn stats(&self) -> Stats {
        let mut total = Stats::default();
        for s in self.files.iter().map(|f| f.stats()) {
            total.patches_applied += s.patches_applied;
            total.patches_reverted += s.patches_reverted;
            total.applied_now += s.applied_now;
            total.windows_opened += s.windows_opened;
            total.writes += s.writes;
            total.protection_calls += s.protection_calls;
            total.bytes_written += s.bytes_written;
            total.undo_bytes_held += s.undo_bytes_held;
        }
        total
    }

    /// The files' patch epochs, summed: it moves whenever any file's does.
    pub fn epoch(&self) -> u64 {
        self.files.iter().map(|f| f.epoch()).sum()
    }

    /// Every tensor's element count and bytes, over all files.
    pub fn size(&self) -> (u64, u64) {
        self.files
            .iter()
            .flat_map(|f| f.tensors())
            .fold((0, 0), |(n, b), t| (n + t.n_elements, b + t.n_bytes))
    }

    /// Says in each file's journal which process writes it.
    pub fn describe_writer(&self, what: &str) -> Result<()> {
        for file in &self.files {
            file.describe_writer(what)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
