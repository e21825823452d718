//! Directional ablation: a direction `r` (unit length, in the residual stream) removed
//! from everything that writes into the residual stream, each tensor requantized to its
//! own type.
//!
//! Layout (ggml's, dims fastest first). A residual writer (`attn_output`, `ffn_down`,
//! and the MoE forms `ffn_down_exps`, `ffn_down_shexp`) has dims `[n_in, n_embd]`, or
//! `[n_in, n_embd, n_expert]`: `n_embd` rows of `n_in` values per expert, row `o`
//! computing component `o` of the residual update (`y[o] = Σ_i W[o·n_in + i]·x[i]`).
//! The output dimension is therefore the row index, and column `i` (the values
//! `W[o·n_in + i]` for every `o`) is the vector that input `i` writes into the
//! residual stream. Removing `r` from the output space is `W' = (I − w·r·rᵀ)·W` in
//! matrix terms (the issue's `W − W·r·rᵀ` in the transposed convention): with
//! `c[i] = Σ_o r[o]·W[o·n_in + i]`, every element becomes `W[o·n_in + i] − w·r[o]·c[i]`.
//! `c` needs every row, so a writer takes two passes over its rows: one to sum `c`,
//! one to rewrite.
//!
//! `token_embd.weight` has dims `[n_embd, n_vocab]`: row `v` is token `v`'s embedding
//! `e`, which becomes `e − w·(e·r)·r`, one row at a time.
//!
//! `--norm-preserve` keeps the Euclidean norm of every vector written into the residual
//! stream: each column of a writer (`‖W'[·, i]‖ = ‖W[·, i]‖`, by scaling the column, so
//! it stays orthogonal to `r`), each row of `token_embd`.
//!
//! Post-norm architectures (Gemma 2 and 3, OLMo 2) multiply a writer's output by an
//! RMSNorm with a per-channel weight `g` before adding it to the residual stream
//! (`blk.N.post_attention_norm.weight` after `attn_output`,
//! `blk.N.post_ffw_norm.weight` after `ffn_down` and its MoE forms). What reaches the
//! residual is `g ⊙ y / rms(y)` for the writer's output `y`, so removing `r` from `y`
//! would not remove it from the residual write. llama.cpp multiplies by the stored
//! weight as it is (`ggml_mul` after `ggml_rms_norm`; Gemma's `1 + w` is folded into
//! the GGUF at conversion), so for such a writer the direction removed from `y` is
//! `u = (g ⊙ r)/‖g ⊙ r‖`: then `(g ⊙ y')·r = y'·(g ⊙ r) = 0`, and the RMS scaling, a
//! positive scalar per token, keeps it zero. Writers without a post-norm use `r`.
//!
//! `token_embd` is used twice by a model with tied embeddings (no `output.weight`):
//! as the input embedding, added to the residual stream without a per-channel norm
//! (Gemma only scales it by `√n_embd`), and as the output head, which reads
//! `output_norm.weight ⊙ norm(h)`. The rows are made orthogonal to `r`, which is right
//! for the input path; the head then still reads the part of `r` that
//! `output_norm.weight` turns into other directions, and the report's note says so.
//!
//! The component along the removal direction `d` (`r` or `u`) of a tensor is `‖dᵀ·M‖`,
//! the norm of the projections onto `d` of the vectors it writes (the `c[i]` of a
//! writer, the `e·r` of each embedding).

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::Path;

use serde::Serialize;

use super::rows::{
    RequantizationError, RewrittenTensor, can_rewrite, for_each_rows, rewrite_rows, rows,
};
use crate::codec;
use crate::error::{Error, Result};
use crate::gguf::{Gguf, TensorInfo};
use crate::types::GgmlType;

/// The tensor kinds that write into the residual stream, edited by default.
pub const RESIDUAL_WRITERS: &[&str] = &[
    "attn_output",
    "ffn_down",
    "ffn_down_exps",
    "ffn_down_shexp",
    "token_embd",
];

/// Most rounds of error feedback after the plain requantization of a residual writer.
const MAX_CORRECTIONS: u32 = 6;

/// A stored component above this many times the noise floor starts another round.
const CORRECTION_NOISE: f64 = 3.0;

/// Direction vectors, unit length, each of the model's embedding length.
#[derive(Clone, Debug, PartialEq)]
pub enum Directions {
    /// One direction for every layer.
    Single(Vec<f32>),
    /// One direction per layer (the layer whose output it describes).
    PerLayer(BTreeMap<u64, Vec<f32>>),
}

impl Directions {
    /// The direction for block `layer`.
    pub fn for_layer(&self, layer: u64) -> Option<&[f32]> {
        match self {
            Directions::Single(v) => Some(v),
            Directions::PerLayer(map) => map.get(&layer).map(Vec::as_slice),
        }
    }

    /// The direction for the embeddings: the single one, or the lowest layer's.
    pub fn for_embeddings(&self) -> Option<(Option<u64>, &[f32])> {
        match self {
            Directions::Single(v) => Some((None, v)),
            Directions::PerLayer(map) => map.iter().next().map(|(l, v)| (Some(*l), v.as_slice())),
        }
    }
}

/// Checks a direction's length, then scales it to unit length.
fn unit(which: String, mut values: Vec<f32>, n_embd: u64) -> Result<Vec<f32>> {
    if values.len() as u64 != n_embd {
        return Err(Error::DirectionLength {
            which,
            found: values.len() as u64,
            expected: n_embd,
        });
    }
    let norm = values
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return Err(Error::ZeroDirection(which));
    }
    for v in &mut values {
        *v = (f64::from(*v) / norm) as f32;
    }
    Ok(values)
}

/// Reads directions from a control-vector GGUF as `llama-cvector-generator` writes it
/// (tensors `direction.N`, one per layer N) or from a `.npy` of one vector (shape
/// `(n_embd,)` or `(1, n_embd)`) or of one vector per layer (`(n_layers, n_embd)`, row
/// L for block L). Each is checked for length and norm and scaled to unit length.
pub fn read_directions(path: &Path, n_embd: u64) -> Result<Directions> {
    let bytes = std::fs::read(path).map_err(|e| Error::io("read direction", path, e))?;
    if bytes.starts_with(b"GGUF") {
        return directions_from_gguf(&Gguf::parse(&bytes)?, n_embd);
    }
    let array = codec::parse_npy(&bytes, path)?;
    match array.shape.as_slice() {
        [_] | [1, _] => Ok(Directions::Single(unit(
            path.display().to_string(),
            array.values,
            n_embd,
        )?)),
        [layers, len] => {
            if *len != n_embd {
                return Err(Error::DirectionLength {
                    which: format!("rows of {}", path.display()),
                    found: *len,
                    expected: n_embd,
                });
            }
            let mut map = BTreeMap::new();
            for (layer, row) in array.values.chunks(n_embd.max(1) as usize).enumerate() {
                let which = format!("{} row {layer}", path.display());
                map.insert(layer as u64, unit(which, row.to_vec(), n_embd)?);
            }
            debug_assert_eq!(map.len() as u64, *layers);
            Ok(Directions::PerLayer(map))
        }
        shape => Err(Error::InvalidDirection(format!(
            "{} has shape {shape:?}; expected (n_embd,) or (n_layers, n_embd)",
            path.display()
        ))),
    }
}

/// The `direction.N` tensors of a control vector.
pub fn directions_from_gguf(gguf: &Gguf<'_>, n_embd: u64) -> Result<Directions> {
    let mut map = BTreeMap::new();
    for t in gguf.tensors() {
        let Some(layer) = t.name.strip_prefix("direction.") else {
            continue;
        };
        let layer: u64 = layer
            .parse()
            .map_err(|_| Error::InvalidDirection(format!("tensor {:?} names no layer", t.name)))?;
        if t.n_elements != n_embd {
            return Err(Error::DirectionLength {
                which: t.name.clone(),
                found: t.n_elements,
                expected: n_embd,
            });
        }
        let values = codec::dequantize_tensor(gguf, t, 0..t.n_elements)?;
        map.insert(layer, unit(t.name.clone(), values, n_embd)?);
    }
    if map.is_empty() {
        return Err(Error::InvalidDirection(
            "the GGUF has no direction.N tensors (not a control vector)".into(),
        ));
    }
    Ok(Directions::PerLayer(map))
}

/// What to ablate and how.
#[derive(Clone, Debug, PartialEq)]
pub struct AblationOptions {
    /// How much of the component to remove (1 removes it all).
    pub weight: f32,
    /// Keep the norm of every vector written into the residual stream.
    pub norm_preserve: bool,
    /// Only these blocks (all when `None`); `token_embd` is not a block and is edited
    /// whenever its kind is selected.
    pub layers: Option<Range<u64>>,
    /// Only these tensor kinds ([`RESIDUAL_WRITERS`] when `None`).
    pub kinds: Option<Vec<String>>,
    /// Importance weights for requantizing the edited tensors (as `llama-quantize
    /// --imatrix` would quantize them); checked against the model first.
    pub imatrix: Option<std::sync::Arc<crate::imatrix::ImportanceMatrix>>,
}

impl Default for AblationOptions {
    fn default() -> AblationOptions {
        AblationOptions {
            weight: 1.0,
            norm_preserve: false,
            layers: None,
            kinds: None,
            imatrix: None,
        }
    }
}

/// What ablation does to one tensor.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AblatedTensor {
    /// The tensor.
    pub name: String,
    /// Its kind (`attn_output`, `token_embd`, ...).
    pub kind: String,
    /// Its type (kept).
    pub ggml_type: GgmlType,
    /// The layer whose direction was used (`None` for the single direction).
    pub direction_layer: Option<u64>,
    /// The post-norm weight `g` that multiplies this writer's output before the
    /// residual stream, when the block has one: the direction removed from the output
    /// is then `(g ⊙ r)/‖g ⊙ r‖`, and the components below are along it. `None`: `r`.
    pub post_norm: Option<String>,
    /// Vectors it writes into the residual stream (columns of a writer, rows of the
    /// embeddings).
    pub vectors: u64,
    /// Component along r before.
    pub component_before: f64,
    /// Component along r of the intended values, before requantization.
    pub component_exact: f64,
    /// Component along r of the values stored after requantization.
    pub component_after: f64,
    /// `requantization.rms · √vectors`: the component a random requantization error of
    /// that size leaves along any unit direction.
    pub noise_floor: f64,
    /// What requantizing cost, against the exact ablated values.
    pub requantization: RequantizationError,
    /// Rounds of error feedback that pushed the stored component down after the
    /// plain requantization (0: the stored bytes are the plain requantization).
    pub correction_rounds: u32,
    /// Bytes of the tensor whose value changes.
    pub changed_bytes: u64,
}

/// A tensor that was selected but is not edited.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SkippedTensor {
    /// The tensor.
    pub name: String,
    /// Its type.
    pub ggml_type: GgmlType,
    /// Why.
    pub reason: String,
}

/// A planned ablation: per-tensor reports and new bytes.
#[derive(Clone, Debug)]
pub struct AblationPlan {
    /// The weight used.
    pub weight: f32,
    /// Whether norms were kept.
    pub norm_preserve: bool,
    /// Per edited tensor.
    pub tensors: Vec<AblatedTensor>,
    /// Selected tensors that cannot be written back (their type has no quantizer) or
    /// that have no direction (a per-layer direction file without their layer).
    pub skipped: Vec<SkippedTensor>,
    /// Things the user should know (tied embeddings change the output head too).
    pub notes: Vec<String>,
    /// The new bytes, in the order of `tensors`.
    pub rewrites: Vec<RewrittenTensor>,
}

/// The kind of a tensor name and its block: `blk.3.attn_output.weight` is
/// `("attn_output", Some(3))`, `token_embd.weight` is `("token_embd", None)`.
fn kind_of(name: &str) -> Option<(&str, Option<u64>)> {
    let stem = name.strip_suffix(".weight")?;
    match crate::edit::split_block_name(stem) {
        Some((block, kind)) if !kind.contains('.') => Some((kind, Some(block))),
        Some(_) => None,
        None if !stem.contains('.') => Some((stem, None)),
        None => None,
    }
}

/// Plans the ablation of `directions` from `gguf`. Nothing is written. Refused with a
/// typed error: a direction of another length ([`Error::DirectionLength`]), layers out
/// of range ([`Error::LayersOutOfRange`]), a weight that is not finite, a kind no
/// tensor has.
pub fn plan_ablation(
    gguf: &Gguf<'_>,
    directions: &Directions,
    options: &AblationOptions,
) -> Result<AblationPlan> {
    plan_ablation_in_shards(std::slice::from_ref(gguf), directions, options)
}

/// [`plan_ablation`] over a shard set, given every shard parsed in order: the first
/// shard's metadata is the model's, each tensor is read from (and rewritten into) the
/// shard that holds it, and a post-norm is found in whichever shard holds it.
pub fn plan_ablation_in_shards(
    shards: &[Gguf<'_>],
    directions: &Directions,
    options: &AblationOptions,
) -> Result<AblationPlan> {
    let Some(gguf) = shards.first() else {
        return Err(Error::InvalidEdit("a shard set of no shard".into()));
    };
    let arch = gguf
        .architecture()
        .ok_or_else(|| Error::InvalidEdit("the file has no general.architecture".into()))?;
    let n_embd = gguf.get_u64(&format!("{arch}.embedding_length"))?;
    let blocks = gguf.get_u64(&format!("{arch}.block_count"))?;
    if !options.weight.is_finite() {
        return Err(Error::InvalidEdit(format!(
            "weight {} is not finite",
            options.weight
        )));
    }
    if let Some(m) = &options.imatrix {
        m.check_shards(shards)?;
    }
    let check_len = |which: String, v: &[f32]| {
        if v.len() as u64 == n_embd {
            Ok(())
        } else {
            Err(Error::DirectionLength {
                which,
                found: v.len() as u64,
                expected: n_embd,
            })
        }
    };
    match directions {
        Directions::Single(v) => check_len("the direction".into(), v)?,
        Directions::PerLayer(map) => {
            for (layer, v) in map {
                check_len(format!("of layer {layer}"), v)?;
            }
        }
    }
    if let Some(layers) = &options.layers
        && (layers.start >= layers.end || layers.end > blocks)
    {
        return Err(Error::LayersOutOfRange {
            start: layers.start,
            end: layers.end,
            blocks,
        });
    }
    let kinds: Vec<String> = match &options.kinds {
        Some(k) => k.clone(),
        None => RESIDUAL_WRITERS.iter().map(|s| (*s).to_owned()).collect(),
    };
    if let Some(k) = &options.kinds {
        for kind in k {
            if !shards
                .iter()
                .flat_map(|g| g.tensors())
                .any(|t| kind_of(&t.name).is_some_and(|(tk, _)| tk == kind))
            {
                return Err(Error::InvalidEdit(format!(
                    "no tensor of kind {kind:?} in the model"
                )));
            }
        }
    }

    let mut plan = AblationPlan {
        weight: options.weight,
        norm_preserve: options.norm_preserve,
        tensors: Vec::new(),
        skipped: Vec::new(),
        notes: Vec::new(),
        rewrites: Vec::new(),
    };
    let tied = shards.iter().all(|g| g.tensor("output.weight").is_none());
    for (gguf, info) in shards
        .iter()
        .flat_map(|g| g.tensors().iter().map(move |t| (g, t)))
    {
        let Some((kind, block)) = kind_of(&info.name) else {
            continue;
        };
        if !kinds.iter().any(|k| k == kind) {
            continue;
        }
        if let (Some(block), Some(layers)) = (block, &options.layers)
            && !layers.contains(&block)
        {
            continue;
        }
        let skip = |reason: String| SkippedTensor {
            name: info.name.clone(),
            ggml_type: info.ggml_type,
            reason,
        };
        let (direction_layer, r) = match block {
            Some(b) => match directions.for_layer(b) {
                Some(r) => (
                    matches!(directions, Directions::PerLayer(_)).then_some(b),
                    r,
                ),
                None => {
                    plan.skipped.push(skip(format!(
                        "the direction file has no direction for layer {b}"
                    )));
                    continue;
                }
            },
            None => match directions.for_embeddings() {
                Some((layer, r)) => (layer, r),
                None => continue,
            },
        };
        if !can_rewrite(info.ggml_type) {
            plan.skipped.push(skip(format!(
                "{} cannot be requantized yet: the tensor is left as it is",
                info.ggml_type
            )));
            continue;
        }
        if codec::needs_importance(info.ggml_type) && importance(options, info)?.is_none() {
            plan.skipped.push(skip(format!(
                "ggml quantizes {} only with importance weights: give --imatrix with \
                 weights for this tensor; the tensor is left as it is",
                info.ggml_type
            )));
            continue;
        }
        let embeddings = block.is_none();
        let residual_dim = if embeddings {
            info.dims.first().copied()
        } else {
            info.dims.get(1).copied()
        };
        if residual_dim != Some(n_embd) {
            plan.skipped.push(skip(format!(
                "its dims {:?} have no residual dimension of n_embd {n_embd} where ggml puts it",
                info.dims
            )));
            continue;
        }
        let post_norm = match block {
            Some(b) => post_norm_of(shards, kind, b, n_embd)?,
            None => None,
        };
        let (report, rewrite) = match (&post_norm, embeddings) {
            (_, true) => ablate_rows(gguf, info, r, options)?,
            (None, false) => ablate_writer(gguf, info, r, options)?,
            (Some((norm_name, g)), false) => {
                let u = unit(
                    format!(
                        "{norm_name} ⊙ the direction of layer {}",
                        block.unwrap_or(0)
                    ),
                    g.iter().zip(r).map(|(&g, &r)| g * r).collect(),
                    n_embd,
                )?;
                ablate_writer(gguf, info, &u, options)?
            }
        };
        plan.tensors.push(AblatedTensor {
            kind: kind.to_owned(),
            direction_layer,
            post_norm: post_norm.map(|(name, _)| name),
            ..report
        });
        plan.rewrites.push(rewrite);
        if embeddings && tied {
            plan.notes.push(
                "the model has no output.weight: its output head is token_embd (tied \
                 embeddings), so the output logits change too; the rows are made \
                 orthogonal to r, as the input path needs, and the head reads the \
                 residual through output_norm.weight, so it still sees the part of r \
                 that norm turns into other directions"
                    .into(),
            );
        }
    }
    Ok(plan)
}

/// The post-norm after a residual writer of block `block`, with its weights: the
/// tensor llama.cpp multiplies the writer's normalized output by before adding it to
/// the residual stream. `None` when the block has none (pre-norm architectures).
fn post_norm_of(
    shards: &[Gguf<'_>],
    kind: &str,
    block: u64,
    n_embd: u64,
) -> Result<Option<(String, Vec<f32>)>> {
    let norm_kind = match kind {
        "attn_output" => "post_attention_norm",
        "ffn_down" | "ffn_down_exps" | "ffn_down_shexp" => "post_ffw_norm",
        _ => return Ok(None),
    };
    let name = format!("blk.{block}.{norm_kind}.weight");
    let Some((gguf, info)) = shards.iter().find_map(|g| Some((g, g.tensor(&name)?))) else {
        return Ok(None);
    };
    if info.n_elements != n_embd {
        return Err(Error::InvalidEdit(format!(
            "{name} has {} values, not n_embd {n_embd}",
            info.n_elements
        )));
    }
    let g = codec::dequantize_tensor(gguf, info, 0..info.n_elements)?;
    Ok(Some((name, g)))
}

fn norm(sum_sq: f64) -> f64 {
    sum_sq.max(0.0).sqrt()
}

fn finish(
    gguf: &Gguf<'_>,
    info: &TensorInfo,
    vectors: u64,
    components: [f64; 3],
    rewrite: RewrittenTensor,
) -> (AblatedTensor, RewrittenTensor) {
    let changed_bytes = crate::ops::differences(gguf.tensor_data(info), &rewrite.bytes)
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    let report = AblatedTensor {
        name: info.name.clone(),
        kind: String::new(),
        ggml_type: info.ggml_type,
        direction_layer: None,
        post_norm: None,
        vectors,
        component_before: norm(components[0]),
        component_exact: norm(components[1]),
        component_after: norm(components[2]),
        noise_floor: rewrite.requantization.rms * (vectors as f64).sqrt(),
        requantization: rewrite.requantization,
        correction_rounds: 0,
        changed_bytes,
    };
    (report, rewrite)
}

/// The importance weights of a tensor, when the options carry a matrix naming it.
fn importance<'o>(options: &'o AblationOptions, info: &TensorInfo) -> Result<Option<&'o [f32]>> {
    match &options.imatrix {
        Some(m) => m.weights_for(info),
        None => Ok(None),
    }
}

/// The embeddings: each row `e` becomes `e − w·(e·r)·r`.
fn ablate_rows(
    gguf: &Gguf<'_>,
    info: &TensorInfo,
    r: &[f32],
    options: &AblationOptions,
) -> Result<(AblatedTensor, RewrittenTensor)> {
    let (row_len, n_rows) = rows(info);
    let row_len = row_len as usize;
    let weight = f64::from(options.weight);
    let dot = |row: &[f32]| -> f64 {
        row.iter()
            .zip(r)
            .map(|(&a, &b)| f64::from(a) * f64::from(b))
            .sum()
    };
    let (mut before, mut exact, mut after) = (0f64, 0f64, 0f64);
    let rewrite = rewrite_rows(
        gguf,
        info,
        &mut |_, values| {
            for row in values.chunks_mut(row_len) {
                let d = dot(row);
                before += d * d;
                let old_sq: f64 = row.iter().map(|&v| f64::from(v) * f64::from(v)).sum();
                let mut new = Vec::with_capacity(row_len);
                for (&v, &rv) in row.iter().zip(r) {
                    new.push(f64::from(v) - weight * d * f64::from(rv));
                }
                let factor = if options.norm_preserve {
                    let new_sq: f64 = new.iter().map(|v| v * v).sum();
                    if new_sq > 0.0 {
                        (old_sq / new_sq).sqrt()
                    } else {
                        1.0
                    }
                } else {
                    1.0
                };
                for (v, n) in row.iter_mut().zip(new) {
                    *v = (n * factor) as f32;
                }
            }
            Ok(())
        },
        &mut |_, intended, stored| {
            for (want, got) in intended.chunks(row_len).zip(stored.chunks(row_len)) {
                let (e, a) = (dot(want), dot(got));
                exact += e * e;
                after += a * a;
            }
        },
        importance(options, info)?,
    )?;
    Ok(finish(gguf, info, n_rows, [before, exact, after], rewrite))
}

/// A residual writer: `W[o·n_in + i] −= w·r[o]·c[i]` per expert slice, with
/// `c[i] = Σ_o r[o]·W[o·n_in + i]` summed in a first pass.
fn ablate_writer(
    gguf: &Gguf<'_>,
    info: &TensorInfo,
    r: &[f32],
    options: &AblationOptions,
) -> Result<(AblatedTensor, RewrittenTensor)> {
    let (n_in, n_rows) = rows(info);
    let n_out = r.len() as u64;
    let slices = n_rows / n_out;
    let n_in_us = n_in as usize;
    let columns = (slices * n_in) as usize;
    // Pass 1: the projections c and, for norm preservation, the column norms.
    let mut c = vec![0f64; columns];
    let mut col_sq = vec![0f64; if options.norm_preserve { columns } else { 0 }];
    for_each_rows(gguf, info, &mut |first_row, values| {
        for (k, row) in values.chunks(n_in_us).enumerate() {
            let g = first_row + k as u64;
            let (slice, o) = ((g / n_out) as usize, (g % n_out) as usize);
            let ro = f64::from(r[o]);
            let cs = &mut c[slice * n_in_us..(slice + 1) * n_in_us];
            for (ci, &v) in cs.iter_mut().zip(row) {
                *ci += ro * f64::from(v);
            }
            if options.norm_preserve {
                let ns = &mut col_sq[slice * n_in_us..(slice + 1) * n_in_us];
                for (n, &v) in ns.iter_mut().zip(row) {
                    *n += f64::from(v) * f64::from(v);
                }
            }
        }
        Ok(())
    })?;
    let weight = f64::from(options.weight);
    // ‖col − w·c·r‖² = ‖col‖² − (2w − w²)·c² for a unit r.
    let factors: Vec<f64> = if options.norm_preserve {
        c.iter()
            .zip(&col_sq)
            .map(|(&ci, &n)| {
                let after = n - (2.0 * weight - weight * weight) * ci * ci;
                if after > 0.0 && n > 0.0 {
                    (n / after).sqrt()
                } else {
                    1.0
                }
            })
            .collect()
    } else {
        Vec::new()
    };
    let before: f64 = c.iter().map(|v| v * v).sum();
    // Pass 2: rewrite, and sum the projections of the intended and stored values.
    // Requantizing a small change to values that already sit on the type's grid can
    // round most of them back (a 4-bit K-quant step is larger than the change), which
    // leaves much of the component in place. When the stored component is above
    // CORRECTION_NOISE times the noise floor, the next round pushes every column
    // further along -r by what the best round so far left, times a gain (error feedback
    // on the projection), so that more values cross a rounding boundary. A round that
    // does no better halves the gain and the next starts again from the best round (a
    // full push can overshoot as the block scales move; on the real model's Q4_K
    // tensors half pushes take the worst stored component from 4x to about 9x below
    // the original). The best round is kept. The requantization error is always
    // measured against the exact ablated values.
    let mut push = vec![0f64; columns];
    let mut best_push = push.clone();
    let mut best_left = Vec::new();
    let mut gain = 1.0;
    let mut best: Option<(f64, f64, RewrittenTensor, u32)> = None;
    for round in 0..=MAX_CORRECTIONS {
        let mut c_exact = vec![0f64; columns];
        let mut c_after = vec![0f64; columns];
        let (mut err_sq, mut err_max, mut want_sq) = (0f64, 0f64, 0f64);
        let mut rewrite = rewrite_rows(
            gguf,
            info,
            &mut |first_row, values| {
                for (k, row) in values.chunks_mut(n_in_us).enumerate() {
                    let g = first_row + k as u64;
                    let (slice, o) = ((g / n_out) as usize, (g % n_out) as usize);
                    let ro = weight * f64::from(r[o]);
                    let base = slice * n_in_us;
                    for (i, v) in row.iter_mut().enumerate() {
                        let mut new = f64::from(*v) - ro * c[base + i];
                        if options.norm_preserve {
                            new *= factors[base + i];
                        }
                        *v = (new - f64::from(r[o]) * push[base + i]) as f32;
                    }
                }
                Ok(())
            },
            &mut |first_row, intended, stored| {
                for (k, (want, got)) in intended
                    .chunks(n_in_us)
                    .zip(stored.chunks(n_in_us))
                    .enumerate()
                {
                    let g = first_row + k as u64;
                    let (slice, o) = ((g / n_out) as usize, (g % n_out) as usize);
                    let ro = f64::from(r[o]);
                    let base = slice * n_in_us;
                    for (i, (&w, &s)) in want.iter().zip(got).enumerate() {
                        // The exact ablated value: the pushed one plus the push.
                        let exact = if round == 0 {
                            f64::from(w)
                        } else {
                            f64::from(w) + ro * push[base + i]
                        };
                        c_exact[base + i] += ro * exact;
                        c_after[base + i] += ro * f64::from(s);
                        let d = f64::from(s) - exact;
                        err_sq += d * d;
                        err_max = err_max.max(d.abs());
                        want_sq += exact * exact;
                    }
                }
            },
            importance(options, info)?,
        )?;
        let count = info.n_elements.max(1) as f64;
        rewrite.requantization = RequantizationError {
            rms: (err_sq / count).sqrt(),
            max_abs: err_max,
            rms_intended: (want_sq / count).sqrt(),
        };
        let exact: f64 = c_exact.iter().map(|v| v * v).sum();
        let after: f64 = c_after.iter().map(|v| v * v).sum();
        let noise = rewrite.requantization.rms * (columns as f64).sqrt();
        let better = best.as_ref().is_none_or(|(_, a, _, _)| after < *a);
        if better {
            if after.sqrt() <= CORRECTION_NOISE * noise {
                best = Some((exact, after, rewrite, round));
                break;
            }
            best = Some((exact, after, rewrite, round));
            best_push.clone_from(&push);
            best_left = c_after;
        } else {
            gain *= 0.5;
        }
        for ((p, b), a) in push.iter_mut().zip(&best_push).zip(&best_left) {
            *p = b + gain * a;
        }
    }
    let Some((exact, after, rewrite, rounds)) = best else {
        return Err(Error::InvalidEdit(format!(
            "tensor {:?} has no rows",
            info.name
        )));
    };
    let (mut report, rewrite) = finish(gguf, info, columns as u64, [before, exact, after], rewrite);
    report.correction_rounds = rounds;
    Ok((report, rewrite))
}
