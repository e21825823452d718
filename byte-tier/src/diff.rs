//! Differences between two GGUF files: metadata keys and tensors, with the size of each
//! tensor's change in bytes and in dequantized values.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::codec;
use crate::gguf::{Gguf, TensorInfo};
use crate::types::GgmlType;
use crate::value::ValueRef;

/// How one tensor present in both files differs.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorChange {
    /// The tensor.
    pub name: String,
    /// Type and shape in A, then in B, when either differs.
    pub layout_change: Option<(String, String)>,
    /// Bytes that differ (when type and shape are equal).
    pub bytes_changed: u64,
    /// Largest |b - a| of the dequantized values (when both dequantize and shapes match).
    pub max_abs: Option<f64>,
    /// Root mean square of b - a.
    pub rms: Option<f64>,
    /// Root mean square of a, to put `rms` in proportion.
    pub rms_a: Option<f64>,
}

/// Everything that differs between two files.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Diff {
    /// Keys only in B.
    pub keys_added: Vec<String>,
    /// Keys only in A.
    pub keys_removed: Vec<String>,
    /// Keys in both with different values (or types).
    pub keys_changed: Vec<String>,
    /// Tensors only in B.
    pub tensors_added: Vec<String>,
    /// Tensors only in A.
    pub tensors_removed: Vec<String>,
    /// Tensors in both that differ.
    pub tensors_changed: Vec<TensorChange>,
    /// Tensors in both, identical.
    pub tensors_unchanged: usize,
}

impl Diff {
    /// Whether the files hold the same metadata and tensors.
    pub fn is_empty(&self) -> bool {
        self.keys_added.is_empty()
            && self.keys_removed.is_empty()
            && self.keys_changed.is_empty()
            && self.tensors_added.is_empty()
            && self.tensors_removed.is_empty()
            && self.tensors_changed.is_empty()
    }
}

fn same_value(a: &ValueRef<'_>, b: &ValueRef<'_>) -> bool {
    match (a, b) {
        (ValueRef::Array(x), ValueRef::Array(y)) => {
            x.element_type() == y.element_type()
                && x.len() == y.len()
                && x.raw_bytes() == y.raw_bytes()
        }
        // Compare floats by bits, so NaN equals itself and -0 differs from 0.
        (ValueRef::F32(x), ValueRef::F32(y)) => x.to_bits() == y.to_bits(),
        (ValueRef::F64(x), ValueRef::F64(y)) => x.to_bits() == y.to_bits(),
        _ => a == b,
    }
}

fn layout(t: &TensorInfo) -> String {
    format!("{} {:?}", t.ggml_type, t.dims)
}

/// Compares `a` with `b`.
pub fn diff(a: &Gguf<'_>, b: &Gguf<'_>) -> Diff {
    diff_sets(std::slice::from_ref(a), std::slice::from_ref(b))
}

/// Compares two models given as shard sets (a single file is a set of one): the keys of
/// their first shards, which hold the general metadata, and the tensors of all shards,
/// matched by name wherever they sit.
pub fn diff_sets(a: &[Gguf<'_>], b: &[Gguf<'_>]) -> Diff {
    let mut d = Diff::default();
    let (Some(a0), Some(b0)) = (a.first(), b.first()) else {
        return d;
    };
    for e in a0.metadata() {
        match b0.get(e.key) {
            None => d.keys_removed.push(e.key.to_string()),
            Some(v) if !same_value(&e.value, &v) => d.keys_changed.push(e.key.to_string()),
            Some(_) => {}
        }
    }
    d.keys_added = b0
        .metadata()
        .iter()
        .filter(|e| a0.get(e.key).is_none())
        .map(|e| e.key.to_string())
        .collect();
    let index = |set: &[Gguf<'_>]| -> HashMap<String, usize> {
        let mut names = HashMap::new();
        for (shard, gguf) in set.iter().enumerate() {
            for t in gguf.tensors() {
                names.entry(t.name.clone()).or_insert(shard);
            }
        }
        names
    };
    let (in_a, in_b) = (index(a), index(b));
    let (all_a, all_b) = (all_tensors(a), all_tensors(b));
    d.tensors_removed = all_a
        .iter()
        .filter(|(_, t)| !in_b.contains_key(&t.name))
        .map(|(_, t)| t.name.clone())
        .collect();
    d.tensors_added = all_b
        .iter()
        .filter(|(_, t)| !in_a.contains_key(&t.name))
        .map(|(_, t)| t.name.clone())
        .collect();
    let pairs: Vec<(&Gguf<'_>, &TensorInfo, &Gguf<'_>, &TensorInfo)> = all_a
        .iter()
        .filter_map(|&(sa, ta)| {
            let sb = *in_b.get(&ta.name)?;
            let tb = b[sb].tensor(&ta.name)?;
            Some((&a[sa], ta, &b[sb], tb))
        })
        .collect();
    let changes: Vec<Option<TensorChange>> = pairs
        .par_iter()
        .map(|(ga, ta, gb, tb)| compare_tensor(ga, gb, ta, tb))
        .collect();
    for change in changes {
        match change {
            Some(c) => d.tensors_changed.push(c),
            None => d.tensors_unchanged += 1,
        }
    }
    d
}

/// Every tensor of a set with the index of its shard, in set order.
fn all_tensors<'s>(set: &'s [Gguf<'_>]) -> Vec<(usize, &'s TensorInfo)> {
    set.iter()
        .enumerate()
        .flat_map(|(shard, g)| g.tensors().iter().map(move |t| (shard, t)))
        .collect()
}

/// Elements decoded at a time when comparing values: a multiple of every block length,
/// so that a window is whole blocks of either type, and small enough that memory stays
/// flat whatever the tensor's size.
const WINDOW_ELEMENTS: usize = 1 << 16;

/// Sums over the values of two tensors of the same element count.
struct Moments {
    max_abs: f64,
    sum_sq: f64,
    sum_sq_a: f64,
}

/// The largest difference, the sum of squared differences and the sum of squares of `a`
/// over the values of `a` and `b`, decoded window by window; `None` when a type cannot
/// be decoded.
fn value_moments(type_a: GgmlType, a: &[u8], type_b: GgmlType, b: &[u8]) -> Option<Moments> {
    let n = codec::element_count(type_a, a.len()).ok()? as usize;
    let bytes =
        |t: GgmlType, elements: usize| elements / t.block_len() as usize * t.block_bytes() as usize;
    let mut m = Moments {
        max_abs: 0.0,
        sum_sq: 0.0,
        sum_sq_a: 0.0,
    };
    let mut at = 0;
    while at < n {
        let end = (at + WINDOW_ELEMENTS).min(n);
        let va = codec::dequantize(type_a, a.get(bytes(type_a, at)..bytes(type_a, end))?).ok()?;
        let vb = codec::dequantize(type_b, b.get(bytes(type_b, at)..bytes(type_b, end))?).ok()?;
        for (x, y) in va.iter().zip(&vb) {
            let delta = f64::from(*y) - f64::from(*x);
            m.max_abs = m.max_abs.max(delta.abs());
            m.sum_sq += delta * delta;
            m.sum_sq_a += f64::from(*x) * f64::from(*x);
        }
        at = end;
    }
    Some(m)
}

fn compare_tensor(
    a: &Gguf<'_>,
    b: &Gguf<'_>,
    ta: &TensorInfo,
    tb: &TensorInfo,
) -> Option<TensorChange> {
    let (da, db) = (a.tensor_data(ta), b.tensor_data(tb));
    let same_layout = ta.ggml_type == tb.ggml_type && ta.dims == tb.dims;
    if same_layout && da == db {
        return None;
    }
    // Counted in place: a list of the differing runs could be as large as the tensor.
    let bytes_changed = if same_layout {
        da.iter().zip(db).filter(|(x, y)| x != y).count() as u64
    } else {
        0
    };
    let mut change = TensorChange {
        name: ta.name.clone(),
        layout_change: (!same_layout).then(|| (layout(ta), layout(tb))),
        bytes_changed,
        max_abs: None,
        rms: None,
        rms_a: None,
    };
    if ta.n_elements == tb.n_elements
        && let Some(moments) = value_moments(ta.ggml_type, da, tb.ggml_type, db)
    {
        let n = ta.n_elements.max(1) as f64;
        change.max_abs = Some(moments.max_abs);
        change.rms = Some((moments.sum_sq / n).sqrt());
        change.rms_a = Some((moments.sum_sq_a / n).sqrt());
    }
    Some(change)
}
