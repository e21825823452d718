//! LoRA merge that keeps the quantization: each target `W` of an adapter in llama.cpp's
//! LoRA GGUF format becomes `W + S·(alpha/rank)·B·A`, requantized to `W`'s own type.
//!
//! Layout (ggml's, dims fastest first). A weight of dims `[n_in, n_out]` is `n_out` rows
//! of `n_in` values: row `o` computes output `o` (`y[o] = Σ_i W[o·n_in + i]·x[i]`).
//! The adapter's `NAME.lora_a` has dims `[n_in, r]` (r rows of `n_in`) and
//! `NAME.lora_b` dims `[r, n_out]` (`n_out` rows of r), so that llama.cpp computes
//! `B·(A·x)`: the change of row `o` is `Σ_k B[o·r + k]·A[k·n_in + ..]`.
//! `token_embd.weight` (dims `[n_embd, n_vocab]`, looked up by row, not multiplied) is
//! llama.cpp's one exception: there `lora_a` has dims `[r, n_vocab]` and `lora_b`
//! `[r, n_embd]`, and the row of token `v` changes by `Σ_k a[v·r + k]·b[e·r + k]` at `e`.
//! The effective factor is llama.cpp's: `S·alpha/r`, or `S` alone when alpha is zero.

use std::collections::BTreeMap;

use rayon::prelude::*;
use serde::Serialize;

use super::rows::{RequantizationError, RewrittenTensor, can_rewrite, rewrite_rows};
use crate::codec;
use crate::error::{Error, Result};
use crate::gguf::{Gguf, TensorInfo};
use crate::types::GgmlType;

/// The key that says a file is an adapter.
const TYPE_KEY: &str = "general.type";
/// The key that says which kind of adapter.
const ADAPTER_TYPE_KEY: &str = "adapter.type";
/// The LoRA alpha.
const ALPHA_KEY: &str = "adapter.lora.alpha";

/// The journal label of a merge of the adapter whose SHA-256 is `sha256`: the identity
/// an unmerge looks for.
pub fn merge_label(sha256_hex: &str) -> String {
    format!("lora merge sha256:{sha256_hex}")
}

/// What a merge does to one tensor.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LoraTensorReport {
    /// The target tensor.
    pub name: String,
    /// Its type (kept).
    pub ggml_type: GgmlType,
    /// The adapter's rank for it.
    pub rank: u64,
    /// The factor applied to `B·A`.
    pub factor: f32,
    /// Root mean square of the change `factor·B·A` over the tensor.
    pub delta_rms: f64,
    /// What requantizing the merged values to the tensor's type cost.
    pub requantization: RequantizationError,
    /// Bytes of the tensor whose value changes.
    pub changed_bytes: u64,
}

/// A planned merge: the new bytes of every target and the report.
#[derive(Clone, Debug)]
pub struct LoraMergePlan {
    /// SHA-256 of the adapter file, lowercase hex: the merge's identity in the journal.
    pub adapter_sha256: String,
    /// `adapter.lora.alpha` (0 when absent, as llama.cpp reads it).
    pub alpha: f32,
    /// The user's scale `S`.
    pub scale: f32,
    /// Per target.
    pub tensors: Vec<LoraTensorReport>,
    /// Adapter tensors llama.cpp ignores too (`*_norm.weight`).
    pub ignored: Vec<String>,
    /// The new bytes, one per target, in the order of `tensors`.
    pub rewrites: Vec<RewrittenTensor>,
}

/// One target of an adapter and its two matrices.
#[derive(Debug)]
struct Pair<'g> {
    /// The shard that holds the target (0 for a single file).
    shard: usize,
    target: &'g TensorInfo,
    a: &'g TensorInfo,
    b: &'g TensorInfo,
}

fn string_key<'a>(adapter: &Gguf<'a>, key: &str) -> Result<&'a str> {
    adapter
        .get(key)
        .and_then(|v| v.as_str())
        .ok_or_else(|| Error::NotAnAdapter(format!("{key} is missing or not a string")))
}

/// Plans the merge of `adapter` (its file's bytes hash to `adapter_sha256`) into `base`
/// with the user's scale `scale`. Nothing is written.
///
/// Refused with a typed error, before any value is computed: a file that is not a LoRA
/// adapter ([`Error::NotAnAdapter`]), another architecture or a target that is missing
/// or of another shape ([`Error::AdapterMismatch`]), an `A` without its `B` or the
/// other way round ([`Error::MissingLoraPair`]), and a target whose type cannot be
/// requantized ([`Error::UnsupportedType`]): a merge is all the targets or none.
pub fn plan_lora_merge(
    base: &Gguf<'_>,
    adapter: &Gguf<'_>,
    adapter_sha256: &str,
    scale: f32,
) -> Result<LoraMergePlan> {
    plan_lora_merge_weighted(base, adapter, adapter_sha256, scale, None)
}

/// [`plan_lora_merge`] with an importance matrix: each target the matrix names is
/// requantized with its weights (the matrix is checked against the base model first).
pub fn plan_lora_merge_weighted(
    base: &Gguf<'_>,
    adapter: &Gguf<'_>,
    adapter_sha256: &str,
    scale: f32,
    imatrix: Option<&crate::imatrix::ImportanceMatrix>,
) -> Result<LoraMergePlan> {
    plan_lora_merge_into_shards(
        std::slice::from_ref(base),
        adapter,
        adapter_sha256,
        scale,
        imatrix,
    )
}

/// [`plan_lora_merge_weighted`] into a shard set, given every shard parsed in order: the
/// first shard's metadata is the model's, each target is found in the shard that holds
/// it, and the matrix is checked against the whole set.
pub fn plan_lora_merge_into_shards(
    shards: &[Gguf<'_>],
    adapter: &Gguf<'_>,
    adapter_sha256: &str,
    scale: f32,
    imatrix: Option<&crate::imatrix::ImportanceMatrix>,
) -> Result<LoraMergePlan> {
    let Some(base) = shards.first() else {
        return Err(Error::InvalidEdit("a shard set of no shard".into()));
    };
    if let Some(m) = imatrix {
        m.check_shards(shards)?;
    }
    if !scale.is_finite() {
        return Err(Error::InvalidEdit(format!("scale {scale} is not finite")));
    }
    let general_type = string_key(adapter, TYPE_KEY)?;
    if general_type != "adapter" {
        return Err(Error::NotAnAdapter(format!(
            "{TYPE_KEY} is {general_type:?}, not \"adapter\""
        )));
    }
    let adapter_type = string_key(adapter, ADAPTER_TYPE_KEY)?;
    if adapter_type != "lora" {
        return Err(Error::NotAnAdapter(format!(
            "{ADAPTER_TYPE_KEY} is {adapter_type:?}, not \"lora\""
        )));
    }
    let alpha = match adapter.get(ALPHA_KEY) {
        None => 0.0,
        Some(v) => v
            .as_f64()
            .filter(|a| a.is_finite())
            .ok_or_else(|| Error::NotAnAdapter(format!("{ALPHA_KEY} is not a finite float")))?
            as f32,
    };
    let adapter_arch = string_key(adapter, "general.architecture")?;
    let base_arch = base.architecture().unwrap_or_default();
    if adapter_arch != base_arch {
        return Err(Error::AdapterMismatch(format!(
            "the adapter is for architecture {adapter_arch:?}, the model is {base_arch:?}"
        )));
    }

    let mut halves: BTreeMap<&str, (Option<&TensorInfo>, Option<&TensorInfo>)> = BTreeMap::new();
    let mut ignored = Vec::new();
    for t in adapter.tensors() {
        if let Some(target) = t.name.strip_suffix(".lora_a") {
            halves.entry(target).or_default().0 = Some(t);
        } else if let Some(target) = t.name.strip_suffix(".lora_b") {
            halves.entry(target).or_default().1 = Some(t);
        } else if t.name.ends_with("_norm.weight") {
            ignored.push(t.name.clone());
        } else {
            return Err(Error::NotAnAdapter(format!(
                "tensor {:?} is neither a lora_a nor a lora_b",
                t.name
            )));
        }
    }
    if halves.is_empty() {
        return Err(Error::NotAnAdapter(
            "it has no lora_a / lora_b tensors".into(),
        ));
    }
    let mut pairs = Vec::with_capacity(halves.len());
    for (target, pair) in halves {
        let (a, b) = match pair {
            (Some(a), Some(b)) => (a, b),
            (Some(_), None) => {
                return Err(Error::MissingLoraPair {
                    present: format!("{target}.lora_a"),
                    missing: format!("{target}.lora_b"),
                });
            }
            (None, _) => {
                return Err(Error::MissingLoraPair {
                    present: format!("{target}.lora_b"),
                    missing: format!("{target}.lora_a"),
                });
            }
        };
        let Some((shard, weight)) = shards
            .iter()
            .enumerate()
            .find_map(|(i, g)| Some((i, g.tensor(target)?)))
        else {
            return Err(Error::AdapterMismatch(format!(
                "the model has no tensor {target:?}"
            )));
        };
        check_shapes(weight, a, b)?;
        for t in [a, b] {
            if !codec::can_dequantize(t.ggml_type) {
                return Err(Error::UnsupportedType {
                    ggml_type: t.ggml_type,
                    operation: "dequantize",
                }
                .in_tensor(&t.name));
            }
        }
        if !can_rewrite(weight.ggml_type) {
            return Err(Error::UnsupportedType {
                ggml_type: weight.ggml_type,
                operation: "requantize",
            }
            .in_tensor(&weight.name));
        }
        let weighted = match imatrix {
            Some(m) => m.weights_for(weight)?.is_some(),
            None => false,
        };
        if codec::needs_importance(weight.ggml_type) && !weighted {
            return Err(Error::ImportanceRequired {
                ggml_type: weight.ggml_type,
            }
            .in_tensor(&weight.name));
        }
        pairs.push(Pair {
            shard,
            target: weight,
            a,
            b,
        });
    }

    let mut tensors = Vec::with_capacity(pairs.len());
    let mut rewrites = Vec::with_capacity(pairs.len());
    for pair in pairs {
        let weights = match imatrix {
            Some(m) => m.weights_for(pair.target)?,
            None => None,
        };
        let (report, rewrite) =
            merge_one(&shards[pair.shard], adapter, &pair, alpha, scale, weights)?;
        tensors.push(report);
        rewrites.push(rewrite);
    }
    Ok(LoraMergePlan {
        adapter_sha256: adapter_sha256.to_owned(),
        alpha,
        scale,
        tensors,
        ignored,
        rewrites,
    })
}

fn is_token_embd(name: &str) -> bool {
    name.ends_with("token_embd.weight")
}

/// The dims of a 2-D tensor (a missing second dimension is 1), or `None` for more.
fn dims2(t: &TensorInfo) -> Option<(u64, u64)> {
    match t.dims.as_slice() {
        [a] => Some((*a, 1)),
        [a, b] => Some((*a, *b)),
        [a, b, rest @ ..] if rest.iter().all(|&d| d == 1) => Some((*a, *b)),
        _ => None,
    }
}

fn check_shapes(weight: &TensorInfo, a: &TensorInfo, b: &TensorInfo) -> Result<()> {
    let mismatch = |what: String| {
        Error::AdapterMismatch(format!(
            "{:?} (dims {:?}) with lora_a {:?} and lora_b {:?}: {what}",
            weight.name, weight.dims, a.dims, b.dims
        ))
    };
    let (Some((n_in, n_out)), Some((a0, a1)), Some((b0, b1))) = (dims2(weight), dims2(a), dims2(b))
    else {
        return Err(mismatch("only 2-D weights can take a LoRA".into()));
    };
    if is_token_embd(&weight.name) {
        // a: [r, n_vocab], b: [r, n_embd].
        if n_in != b1 || n_out != a1 || a0 != b0 {
            return Err(mismatch(
                "token_embd needs lora_a [r, n_vocab] and lora_b [r, n_embd]".into(),
            ));
        }
    } else if n_in != a0 || n_out != b1 || a1 != b0 {
        return Err(mismatch(
            "a weight [n_in, n_out] needs lora_a [n_in, r] and lora_b [r, n_out]".into(),
        ));
    }
    if a0.min(a1) == 0 {
        return Err(mismatch("the rank is zero".into()));
    }
    Ok(())
}

fn merge_one(
    base: &Gguf<'_>,
    adapter: &Gguf<'_>,
    pair: &Pair<'_>,
    alpha: f32,
    scale: f32,
    weights: Option<&[f32]>,
) -> Result<(LoraTensorReport, RewrittenTensor)> {
    let dequantize = |t: &TensorInfo| codec::dequantize_tensor(adapter, t, 0..t.n_elements);
    let a = dequantize(pair.a)?;
    let b = dequantize(pair.b)?;
    let (n_in, _) = dims2(pair.target).unwrap_or((1, 1));
    let embd = is_token_embd(&pair.target.name);
    // `left` holds one row of `rank` values per output row, `right` is `rank` rows of
    // `n_in`: the change of output row `o` is Σ_k left[o·rank + k]·right[k·n_in + ..].
    let (rank, left, right) = if embd {
        let rank = pair.a.dims[0];
        let mut right = vec![0f32; (rank * n_in) as usize];
        for e in 0..n_in as usize {
            for k in 0..rank as usize {
                right[k * n_in as usize + e] = b[e * rank as usize + k];
            }
        }
        (rank, a, right)
    } else {
        (pair.a.dims[1], b, a)
    };
    let factor = if alpha != 0.0 {
        scale * alpha / rank as f32
    } else {
        scale
    };
    let (n_in, rank_us) = (n_in as usize, rank as usize);
    let mut delta_sq = 0f64;
    let rewrite = rewrite_rows(
        base,
        pair.target,
        &mut |first_row, values| {
            let sum: f64 = values
                .par_chunks_mut(n_in)
                .enumerate()
                .map(|(k, row)| {
                    let o = first_row as usize + k;
                    let l = &left[o * rank_us..(o + 1) * rank_us];
                    let mut delta = vec![0f32; n_in];
                    for (j, &lj) in l.iter().enumerate() {
                        let r = &right[j * n_in..(j + 1) * n_in];
                        for (d, &rv) in delta.iter_mut().zip(r) {
                            *d += lj * rv;
                        }
                    }
                    let mut sq = 0f64;
                    for (w, d) in row.iter_mut().zip(&delta) {
                        let change = factor * d;
                        *w += change;
                        sq += f64::from(change) * f64::from(change);
                    }
                    sq
                })
                .sum();
            delta_sq += sum;
            Ok(())
        },
        &mut |_, _, _| {},
        weights,
    )?;
    let old = base.tensor_data(pair.target);
    let changed_bytes = crate::ops::differences(old, &rewrite.bytes)
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    let report = LoraTensorReport {
        name: pair.target.name.clone(),
        ggml_type: pair.target.ggml_type,
        rank,
        factor,
        delta_rms: (delta_sq / pair.target.n_elements.max(1) as f64).sqrt(),
        requantization: rewrite.requantization,
        changed_bytes,
    };
    Ok((report, rewrite))
}
