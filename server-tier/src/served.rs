//! The model the proxy patches: one file, or every shard of a set as llama-server maps
//! them when it loads a set from its first shard. Each file is its own live model
//! (its own mapping, journal, patches and history); a patch goes to the file that holds
//! its tensor, so everything memory-tier guarantees for a patch holds in that file.

use std::path::Path;
use std::sync::Arc;

use memory_tier::{AppliedPatch, AttachMode, HistoryEntry, LiveModel, Stats};
use uuid::Uuid;

use crate::{Error, Result};

/// The files of the served model, each attached shared.
#[derive(Debug)]
pub(crate) struct ServedModel {
    files: Vec<Arc<LiveModel>>,
}

impl ServedModel {
    /// Attaches `path`, or every shard of the set it is one shard of (the set checked:
    /// a missing or foreign shard is an error naming it).
    pub(crate) fn attach(path: &Path) -> Result<ServedModel> {
        let paths = match byte_tier::split::open_set_of(path)? {
            Some(set) => set.files().iter().map(|f| f.path().to_owned()).collect(),
            None => vec![path.to_owned()],
        };
        let files = paths
            .iter()
            .map(|p| LiveModel::attach(p, AttachMode::Shared).map(Arc::new))
            .collect::<memory_tier::Result<Vec<_>>>()?;
        Ok(ServedModel { files })
    }

    /// One file attached elsewhere (through an agent).
    pub(crate) fn one(model: Arc<LiveModel>) -> ServedModel {
        ServedModel { files: vec![model] }
    }

    /// Every file, in set order.
    pub(crate) fn files(&self) -> &[Arc<LiveModel>] {
        &self.files
    }

    /// The model when it is one file.
    pub(crate) fn single(&self) -> Option<&Arc<LiveModel>> {
        match self.files.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// The file a server loads the model from (the first shard of a set).
    pub(crate) fn first(&self) -> &Arc<LiveModel> {
        &self.files[0]
    }

    /// The file that holds tensor `name`; the first file's error when none does.
    pub(crate) fn holder(&self, name: &str) -> Result<&Arc<LiveModel>> {
        if let Some(file) = self.files.iter().find(|f| f.tensor(name).is_ok()) {
            return Ok(file);
        }
        self.first().tensor(name)?;
        Err(Error::NotFound(format!("no tensor {name:?}")))
    }

    /// The file that holds the applied patch `id`.
    pub(crate) fn holder_of_patch(&self, id: Uuid) -> Result<&Arc<LiveModel>> {
        self.files
            .iter()
            .find(|f| f.applied().iter().any(|(applied, _)| *applied == id))
            .ok_or_else(|| Error::NotFound(format!("no applied patch {id}")))
    }

    /// The applied patches of every file (id, name), oldest first within each file.
    pub(crate) fn applied(&self) -> Vec<(Uuid, String)> {
        self.files.iter().flat_map(|f| f.applied()).collect()
    }

    /// The applied patches of every file, each with its file's place in the set.
    pub(crate) fn applied_patches(&self) -> Vec<(usize, AppliedPatch)> {
        self.files
            .iter()
            .enumerate()
            .flat_map(|(i, f)| f.applied_patches().into_iter().map(move |a| (i, a)))
            .collect()
    }

    /// The history of every file, in time order.
    pub(crate) fn history(&self) -> Vec<HistoryEntry> {
        let mut all: Vec<HistoryEntry> = self.files.iter().flat_map(|f| f.history()).collect();
        all.sort_by_key(|h| h.at);
        all
    }

    /// The counters of every file, summed.
    pub(crate) fn stats(&self) -> Stats {
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
    pub(crate) fn epoch(&self) -> u64 {
        self.files.iter().map(|f| f.epoch()).sum()
    }

    /// Every tensor's element count and bytes over all files.
    pub(crate) fn size(&self) -> (u64, u64) {
        self.files
            .iter()
            .flat_map(|f| f.tensors())
            .fold((0, 0), |(n, b), t| (n + t.n_elements, b + t.n_bytes))
    }

    /// Says in each file's journal which process writes it.
    pub(crate) fn describe_writer(&self, what: &str) -> Result<()> {
        for file in &self.files {
            file.describe_writer(what)?;
        }
        Ok(())
    }
}
