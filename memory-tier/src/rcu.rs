//! The read-copy-update path for engines that read tensors through a pointer table: a
//! patched copy of a tensor is built off to the side and swapped in with one atomic
//! store; readers holding the old copy keep it until they let go, and it is freed when
//! the last one does.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use byte_tier::codec::{self, TransformReport};
use byte_tier::{GgmlType, TensorInfo};

use crate::error::{Error, Result};
use crate::live::LiveModel;
use crate::patch::ValueTransform;

/// One tensor's data as engines see it.
#[derive(Clone, Debug)]
pub struct TensorData {
    /// Its type.
    pub ggml_type: GgmlType,
    /// Its bytes.
    pub bytes: Arc<[u8]>,
}

/// A pointer table of tensors, swapped atomically on every patch.
#[derive(Debug)]
pub struct TensorTable {
    table: ArcSwap<HashMap<String, TensorData>>,
}

impl TensorTable {
    /// A table holding copies of the named tensors of `model`.
    pub fn from_model(model: &LiveModel, names: &[&str]) -> Result<TensorTable> {
        let mut table = HashMap::with_capacity(names.len());
        for name in names {
            let info: &TensorInfo = model.tensor(name)?;
            let bytes = model.extract(info.data_range())?;
            table.insert(
                (*name).to_owned(),
                TensorData {
                    ggml_type: info.ggml_type,
                    bytes: bytes.into(),
                },
            );
        }
        Ok(TensorTable {
            table: ArcSwap::from_pointee(table),
        })
    }

    /// The current table: a cheap atomic load; the table stays valid while held.
    pub fn load(&self) -> Arc<HashMap<String, TensorData>> {
        self.table.load_full()
    }

    /// One tensor's current data.
    pub fn get(&self, name: &str) -> Option<TensorData> {
        self.table.load().get(name).cloned()
    }

    /// Transforms a tensor: the new copy is built from the current one and swapped in;
    /// concurrent patches of the table retry on the newest table.
    pub fn patch(&self, name: &str, transform: &ValueTransform) -> Result<TransformReport> {
        let mut report = None;
        let mut failure = None;
        self.table.rcu(|current| {
            let mut next = HashMap::clone(current);
            let Some(entry) = next.get_mut(name) else {
                failure = Some(Error::NoSuchTensor(name.to_owned()));
                return next;
            };
            let mut bytes = entry.bytes.to_vec();
            let n_blocks = bytes.len() as u64 / entry.ggml_type.block_bytes();
            let n = n_blocks * entry.ggml_type.block_len();
            let t = transform.as_codec();
            match codec::transform_range(entry.ggml_type, &mut bytes, 0..n, &t) {
                Ok(r) => {
                    report = Some(r);
                    failure = None;
                    entry.bytes = bytes.into();
                }
                Err(e) => failure = Some(Error::Bytes(e.in_tensor(name))),
            }
            next
        });
        match (failure, report) {
            (Some(error), _) => Err(error),
            (None, Some(report)) => Ok(report),
            (None, None) => Err(Error::NoSuchTensor(name.to_owned())),
        }
    }
}
