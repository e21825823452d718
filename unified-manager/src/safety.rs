//! The `safety` pipeline: an integrity check against a manifest, a NaN/infinity scan with
//! optional repair, an opt-in outlier clamp, and (with a server attached) a default rule
//! set. Every write of a single file goes through the live region as one memory-tier
//! transaction; the writes to a shard set are one set transaction over its shards.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

use byte_tier::codec::{self, NonFiniteReport};
use byte_tier::plan::FileStamp;
use byte_tier::split::transaction::{ShardWrites, revert_set_transaction, run_set_transaction};
use byte_tier::verify::Manifest;
use byte_tier::{Gguf, TensorInfo};
use memory_tier::{MemoryPatch, PatchKind, PatchPlan, PatchTarget, Payload};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manager::{Manager, ModelId};
use crate::report::{PipelineReport, StepOutcome, Tier};
use crate::server::{Rule, default_safety_rules};

/// The priority of the pipeline's repairs: above any ordinary patch, so that a repair
/// of bytes another patch wrote displaces that patch (it is reverted first; reverting
/// the pipeline run then leaves the bytes as they were before that patch).
pub const SAFETY_PRIORITY: i32 = 1_000_000;

/// How non-finite values are repaired.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Repair {
    /// NaN and infinity become 0.
    Zero,
    /// NaN becomes 0; +/-infinity becomes +/- the tensor's largest finite magnitude.
    Clamp,
}

/// The server rules the pipeline adds when a server is attached.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerDefaults {
    /// The most tokens a request may ask for (`max_tokens`, `n_predict`).
    pub max_tokens: u64,
    /// Literal strings redacted from every response.
    #[serde(default)]
    pub redact: Vec<String>,
}

impl Default for ServerDefaults {
    fn default() -> ServerDefaults {
        ServerDefaults {
            max_tokens: 1024,
            redact: Vec::new(),
        }
    }
}

/// What the safety pipeline does.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SafetyOptions {
    /// Repair NaN and infinity (left alone and reported when `None`).
    pub repair: Option<Repair>,
    /// Clamp each tensor's values into mean +/- k standard deviations (opt-in).
    pub outlier_sigmas: Option<f32>,
    /// A manifest (gguf-hash form) the model must match before anything is written.
    pub manifest: Option<String>,
    /// Rules for an attached server (`None`: add none).
    pub server: Option<ServerDefaults>,
    /// Importance weights for the requantization of fixed rows, applied as
    /// llama-quantize --imatrix does; the types ggml quantizes only with weights
    /// (IQ1_S, IQ2_XXS, IQ2_XS) are fixed only where the matrix names the tensor.
    pub imatrix: Option<std::sync::Arc<byte_tier::imatrix::ImportanceMatrix>>,
    /// Plan and report, write nothing.
    pub dry_run: bool,
}

/// One tensor's planned fix.
#[derive(Debug, Default)]
struct TensorFix {
    repaired_values: u64,
    clamped_values: u64,
    repair_bytes: u64,
    clamp_bytes: u64,
    /// Why the tensor could not be fixed.
    skipped: Option<String>,
    /// The fix: new bytes at an absolute offset in the file, over the span of the
    /// changed blocks.
    write: Option<(u64, Vec<u8>)>,
}

/// Finite-value statistics of a tensor.
#[derive(Clone, Copy, Debug, Default)]
struct Moments {
    n: u64,
    sum: f64,
    sum_sq: f64,
    max_abs: f32,
}

impl Moments {
    fn add(&mut self, values: &[f32]) {
        for &v in values.iter().filter(|v| v.is_finite()) {
            self.n += 1;
            self.sum += f64::from(v);
            self.sum_sq += f64::from(v) * f64::from(v);
            self.max_abs = self.max_abs.max(v.abs());
        }
    }

    fn bounds(&self, sigmas: f32) -> Option<(f32, f32)> {
        if self.n == 0 {
            return None;
        }
        let mean = self.sum / self.n as f64;
        let var = (self.sum_sq / self.n as f64 - mean * mean).max(0.0);
        let spread = f64::from(sigmas) * var.sqrt();
        Some(((mean - spread) as f32, (mean + spread) as f32))
    }
}

/// Largest tensor, in values, decoded once and kept for the scan, the statistics and the
/// fix (64 MiB of f32 per tensor being examined); a larger one is decoded twice, window by
/// window of this size: scan and statistics, then fix.
const ONE_PASS_VALUES: u64 = 16 << 20;

/// Element windows of a tensor: whole units (blocks, or rows when the fix requantizes
/// whole rows), about `size` elements each.
fn windows(tensor: &TensorInfo, size: u64, unit: u64) -> impl Iterator<Item = Range<u64>> {
    let step = size.div_ceil(unit) * unit;
    let n = tensor.n_elements;
    (0..n.div_ceil(step)).map(move |i| i * step..((i + 1) * step).min(n))
}

/// The NaN/Inf scan of a tensor and the plan of its repair and outlier clamp, from one
/// decode of its values when there are at most `one_pass_values` of them, else from two
/// (window by window of that size).
fn examine(
    gguf: &Gguf<'_>,
    tensor: &TensorInfo,
    repair: Option<Repair>,
    sigmas: Option<f32>,
    weights: Option<&[f32]>,
    one_pass_values: u64,
) -> Result<(NonFiniteReport, TensorFix)> {
    if repair.is_none() && sigmas.is_none() {
        return Ok((codec::scan_tensor(gguf, tensor)?, TensorFix::default()));
    }
    let ty = tensor.ggml_type;
    let data = gguf.tensor_data(tensor);
    let in_tensor = |e: byte_tier::Error| e.in_tensor(&tensor.name);
    let n = tensor.n_elements;
    if n <= one_pass_values {
        let mut values = vec![0f32; n as usize];
        let scan = codec::scan_non_finite_into(ty, data, 0..n, &mut values).map_err(in_tensor)?;
        let mut planner = FixPlanner::new(tensor, data, &scan, repair, sigmas, weights)?;
        if let Some(planner) = &mut planner {
            planner.moments.add(&values);
            planner.add_values(0, &values)?;
        }
        let fix = planner.map_or_else(
            || Ok(skipped_or_nothing(tensor, &scan, repair, sigmas, weights)),
            FixPlanner::finish,
        )?;
        return Ok((scan, fix));
    }
    let mut values = Vec::new();
    let mut scan = NonFiniteReport::default();
    let mut moments = Moments::default();
    let unit = match weights {
        Some(_) => tensor.dims.first().copied().unwrap_or(1),
        None => ty.block_len(),
    };
    for window in windows(tensor, one_pass_values, unit) {
        values.resize((window.end - window.start) as usize, 0.0);
        let part = codec::scan_non_finite_into(ty, data, window, &mut values).map_err(in_tensor)?;
        scan = scan.merge(part);
        moments.add(&values);
    }
    let Some(mut planner) = FixPlanner::new(tensor, data, &scan, repair, sigmas, weights)? else {
        return Ok((
            scan.clone(),
            skipped_or_nothing(tensor, &scan, repair, sigmas, weights),
        ));
    };
    planner.moments = moments;
    for window in windows(tensor, one_pass_values, unit) {
        values.resize((window.end - window.start) as usize, 0.0);
        codec::dequantize_range(ty, data, window.clone(), &mut values).map_err(in_tensor)?;
        planner.add_values(window.start, &values)?;
    }
    Ok((scan, planner.finish()?))
}

/// The fix of a tensor that needs no values: nothing, or why it cannot be fixed.
fn skipped_or_nothing(
    tensor: &TensorInfo,
    scan: &NonFiniteReport,
    repair: Option<Repair>,
    sigmas: Option<f32>,
    weights: Option<&[f32]>,
) -> TensorFix {
    let wanted = (repair.is_some() && !scan.is_clean()) || sigmas.is_some();
    let mut fix = TensorFix::default();
    if wanted && !codec::can_quantize(tensor.ggml_type) {
        fix.skipped = Some(format!(
            "{} has no quantizer to write fixed values",
            tensor.ggml_type.name()
        ));
    } else if wanted && codec::needs_importance(tensor.ggml_type) && weights.is_none() {
        fix.skipped = Some(format!(
            "ggml quantizes {} only with importance weights, and no importance matrix \
             (--imatrix) names the tensor: it is left as it is",
            tensor.ggml_type.name()
        ));
    }
    fix
}

/// Plans a tensor's repair and outlier clamp block by block from its decoded values.
/// Without importance weights each fixed block is requantized alone (every quantizer
/// without weights works block by block). With them, each row holding a fixed block is
/// requantized whole with its weights, as llama-quantize --imatrix quantizes it (some
/// of ggml's weighted quantizers use row statistics), and only its fixed blocks are
/// written.
struct FixPlanner<'a> {
    tensor: &'a TensorInfo,
    data: &'a [u8],
    repair: Option<Repair>,
    sigmas: Option<f32>,
    /// The tensor's importance weights: one per column, per expert.
    weights: Option<&'a [f32]>,
    /// Statistics of the finite values, complete before the first `add_values`.
    moments: Moments,
    fix: TensorFix,
    /// (byte offset in the tensor, new bytes) of each changed block.
    blocks: Vec<(usize, Vec<u8>)>,
    /// One block's (or row's) values, reused.
    fixed: Vec<f32>,
}

impl<'a> FixPlanner<'a> {
    /// A planner, or `None` when the tensor needs no fix or cannot be fixed.
    fn new(
        tensor: &'a TensorInfo,
        data: &'a [u8],
        scan: &NonFiniteReport,
        repair: Option<Repair>,
        sigmas: Option<f32>,
        weights: Option<&'a [f32]>,
    ) -> Result<Option<FixPlanner<'a>>> {
        let repairing = repair.is_some() && !scan.is_clean();
        let writable = codec::can_quantize(tensor.ggml_type)
            && (weights.is_some() || !codec::needs_importance(tensor.ggml_type));
        if (!repairing && sigmas.is_none()) || !writable {
            return Ok(None);
        }
        Ok(Some(FixPlanner {
            tensor,
            data,
            repair,
            sigmas,
            weights,
            moments: Moments::default(),
            fix: TensorFix::default(),
            blocks: Vec::new(),
            fixed: Vec::new(),
        }))
    }

    /// Fixes `values` (one block) in place: the counts of values repaired and clamped,
    /// or `None` when the block holds NaN or infinity and no repair was asked for (it
    /// cannot be written back, and is left as it is; the scan counts it).
    fn fix_block(&self, values: &mut [f32]) -> Option<(u64, u64)> {
        if self.repair.is_none() && values.iter().any(|v| !v.is_finite()) {
            return None;
        }
        let outlier_bounds = self.sigmas.and_then(|k| self.moments.bounds(k));
        let (mut repaired, mut clamped) = (0u64, 0u64);
        for v in values {
            if !v.is_finite() {
                match self.repair {
                    Some(Repair::Zero) => *v = 0.0,
                    Some(Repair::Clamp) if v.is_nan() => *v = 0.0,
                    Some(Repair::Clamp) => *v = self.moments.max_abs.copysign(*v),
                    None => continue,
                }
                repaired += 1;
            } else if let Some((lo, hi)) = outlier_bounds
                && (*v < lo || *v > hi)
            {
                *v = v.clamp(lo, hi);
                clamped += 1;
            }
        }
        Some((repaired, clamped))
    }

    /// Counts a fixed block and keeps its new bytes when they differ from the old.
    fn record(&mut self, offset: usize, (repaired, clamped): (u64, u64), new: &[u8]) {
        let old = &self.data[offset..offset + new.len()];
        let changed: u64 = byte_tier::ops::differences(old, new)
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        self.fix.repaired_values += repaired;
        self.fix.clamped_values += clamped;
        if repaired > 0 {
            self.fix.repair_bytes += changed;
        } else {
            self.fix.clamp_bytes += changed;
        }
        if changed > 0 {
            self.blocks.push((offset, new.to_vec()));
        }
    }

    /// Plans the blocks of `values`, the decoded elements from `first_element` on (whole
    /// blocks; whole rows with importance weights).
    fn add_values(&mut self, first_element: u64, values: &[f32]) -> Result<()> {
        if let Some(weights) = self.weights {
            return self.add_rows(first_element, values, weights);
        }
        let ty = self.tensor.ggml_type;
        let block_len = ty.block_len() as usize;
        let block_bytes = ty.block_bytes() as usize;
        let first_block = (first_element / ty.block_len()) as usize;
        let mut fixed = std::mem::take(&mut self.fixed);
        for (b, old) in values.chunks(block_len).enumerate() {
            fixed.clear();
            fixed.extend_from_slice(old);
            let Some(counts) = self.fix_block(&mut fixed).filter(|(r, c)| r + c > 0) else {
                continue;
            };
            let new = codec::quantize(ty, &fixed).map_err(|e| e.in_tensor(&self.tensor.name))?;
            self.record((first_block + b) * block_bytes, counts, &new);
        }
        self.fixed = fixed;
        Ok(())
    }

    /// [`add_values`](Self::add_values) with importance weights: `values` are whole rows.
    /// A row with a block that cannot be written back (NaN or infinity, no repair) is
    /// left as it is, since its row statistics cannot be computed.
    fn add_rows(&mut self, first_element: u64, values: &[f32], weights: &[f32]) -> Result<()> {
        let ty = self.tensor.ggml_type;
        let in_tensor = |e: byte_tier::Error| e.in_tensor(&self.tensor.name);
        let dims = &self.tensor.dims;
        let row_len = dims.first().copied().unwrap_or(1);
        let rows_per_expert = dims.get(1).copied().unwrap_or(1).max(1);
        let block_len = ty.block_len() as usize;
        let block_bytes = ty.block_bytes() as usize;
        let row_bytes = (row_len as usize / block_len) * block_bytes;
        let mut fixed = std::mem::take(&mut self.fixed);
        for (r, old) in values.chunks(row_len as usize).enumerate() {
            let row = first_element / row_len + r as u64;
            fixed.clear();
            fixed.extend_from_slice(old);
            let counts: Option<Vec<(u64, u64)>> = fixed
                .chunks_mut(block_len)
                .map(|block| self.fix_block(block))
                .collect();
            let Some(counts) = counts.filter(|c| c.iter().any(|(r, c)| r + c > 0)) else {
                continue;
            };
            let expert = (row / rows_per_expert) as usize;
            let row_weights = weights
                .get(expert * row_len as usize..(expert + 1) * row_len as usize)
                .ok_or_else(|| {
                    Error::Refused(format!(
                        "the importance weights of {} do not cover row {row}",
                        self.tensor.name
                    ))
                })?;
            let new = codec::quantize_weighted(ty, &fixed, row_len as usize, row_weights)
                .map_err(in_tensor)?;
            for (b, &block_counts) in counts.iter().enumerate() {
                if block_counts.0 + block_counts.1 > 0 {
                    let at = b * block_bytes;
                    let offset = row as usize * row_bytes + at;
                    self.record(offset, block_counts, &new[at..at + block_bytes]);
                }
            }
        }
        self.fixed = fixed;
        Ok(())
    }

    /// The fix: one write over the span of the changed blocks.
    fn finish(self) -> Result<TensorFix> {
        let mut fix = self.fix;
        let block_bytes = self.tensor.ggml_type.block_bytes() as usize;
        if let (Some(first), Some(last)) = (self.blocks.first(), self.blocks.last()) {
            let span = first.0..last.0 + block_bytes;
            let mut new = self.data[span.clone()].to_vec();
            for (offset, bytes) in &self.blocks {
                new[offset - span.start..offset - span.start + block_bytes].copy_from_slice(bytes);
            }
            fix.write = Some((self.tensor.data_offset + span.start as u64, new));
        }
        Ok(fix)
    }
}

/// A planned write of the tensor `name` as a memory patch of the pipeline.
fn repair_patch(name: &str, offset: u64, bytes: Vec<u8>) -> MemoryPatch {
    let end = offset + bytes.len() as u64;
    let mut patch = MemoryPatch::new(
        format!("safety:{name}"),
        PatchTarget::Raw(offset..end),
        Payload::Bytes(bytes),
    );
    patch.kind = PatchKind::WeightModification;
    patch.with_priority(SAFETY_PRIORITY)
}

/// The integrity, scan, repair and clamp steps, with the model's writers held off: the
/// repairs are planned on exactly the bytes they replace, as one transaction plan.
/// Writes nothing. Returns the plan and whether the run goes on (false when the
/// integrity check failed; the plan is then empty).
fn plan_repairs(
    live: &memory_tier::LiveModel,
    options: &SafetyOptions,
    report: &mut PipelineReport,
) -> Result<(PatchPlan, bool)> {
    let fixes = {
        let guard = live.read();
        let gguf = Gguf::parse(guard.bytes())?;
        plan_fixes(std::slice::from_ref(&gguf), options, report)?
    };
    let Some(fixes) = fixes else {
        return Ok((live.plan_transaction(Vec::new())?, false));
    };
    let patches = fixes
        .into_iter()
        .map(|f| repair_patch(&f.name, f.offset, f.bytes))
        .collect();
    Ok((live.plan_transaction(patches)?, true))
}

/// One tensor's planned repair in a model of one file or several shards.
struct PlannedFix {
    /// The shard that holds the tensor (0 for a single file).
    shard: usize,
    name: String,
    /// Absolute offset of the new bytes in the shard.
    offset: u64,
    bytes: Vec<u8>,
}

/// The integrity, scan, repair and clamp steps over a model given as its files (one, or
/// every shard of a set in order), reported once for the whole model. Writes nothing.
/// Returns the repairs, or `None` when the integrity check failed.
fn plan_fixes(
    shards: &[Gguf<'_>],
    options: &SafetyOptions,
    report: &mut PipelineReport,
) -> Result<Option<Vec<PlannedFix>>> {
    let all_tensors = || shards.iter().flat_map(|g| g.tensors());
    let started = Instant::now();
    let outcome = match &options.manifest {
        None => StepOutcome::skipped("no manifest given"),
        Some(text) => {
            let check = Manifest::of_set(shards).check(text)?;
            let examined = all_tensors().map(|t| t.n_bytes).sum();
            if check.is_ok() {
                StepOutcome::ok(
                    format!("{} tensors match the manifest", check.matched),
                    examined,
                )
            } else {
                StepOutcome::failed(
                    format!(
                        "{} match, {} differ, {} missing, {} unlisted",
                        check.matched,
                        check.mismatched.len(),
                        check.missing.len(),
                        check.unlisted.len()
                    ),
                    format!(
                        "the model does not match the manifest (first differing: {})",
                        check
                            .mismatched
                            .first()
                            .or(check.missing.first())
                            .or(check.unlisted.first())
                            .map_or("the whole-file digest", String::as_str)
                    ),
                )
            }
        }
    };
    report.push("integrity", Tier::Byte, started, outcome);
    if !report.succeeded() {
        return Ok(None);
    }

    if let Some(imatrix) = &options.imatrix {
        imatrix.check_shards(shards)?;
    }
    let started = Instant::now();
    let tensors: Vec<(usize, &TensorInfo)> = shards
        .iter()
        .enumerate()
        .flat_map(|(shard, g)| g.tensors().iter().map(move |t| (shard, t)))
        .filter(|(_, t)| codec::can_dequantize(t.ggml_type))
        .collect();
    // One pass per tensor: the scan, the statistics and the fix plan share its decode.
    let (scans, fixes): (Vec<NonFiniteReport>, Vec<(usize, &TensorInfo, TensorFix)>) = tensors
        .par_iter()
        .map(|&(shard, t)| {
            let weights = match &options.imatrix {
                Some(imatrix) => imatrix.weights_for(t)?,
                None => None,
            };
            examine(
                &shards[shard],
                t,
                options.repair,
                options.outlier_sigmas,
                weights,
                ONE_PASS_VALUES,
            )
            .map(|(scan, fix)| (scan, (shard, t, fix)))
        })
        .collect::<Result<Vec<_>>>()?
        .into_iter()
        .unzip();
    let (nan, inf): (u64, u64) = scans
        .iter()
        .fold((0, 0), |(n, i), s| (n + s.nan_count, i + s.inf_count));
    let dirty = scans.iter().filter(|s| !s.is_clean()).count();
    let unscanned = all_tensors().count() - tensors.len();
    report.push(
        "scan",
        Tier::Memory,
        started,
        StepOutcome::ok(
            format!(
                "{} tensors scanned ({unscanned} of types without a decoder left out): {nan} NaN and {inf} infinite values in {dirty} tensors",
                tensors.len()
            ),
            tensors.iter().map(|(_, t)| t.n_bytes).sum(),
        ),
    );

    let started = Instant::now();
    let skipped: Vec<String> = fixes
        .iter()
        .filter_map(|(_, t, f)| f.skipped.as_ref().map(|why| format!("{}: {why}", t.name)))
        .collect();
    let sum = |f: &dyn Fn(&TensorFix) -> u64| fixes.iter().map(|(_, _, x)| f(x)).sum::<u64>();
    let count = |f: &dyn Fn(&TensorFix) -> bool| fixes.iter().filter(|(_, _, x)| f(x)).count();
    if options.repair.is_none() && nan + inf > 0 {
        report.unresolved.push(format!(
            "{} NaN and {} infinite values in {dirty} tensors (no repair asked for)",
            nan, inf
        ));
    }
    report
        .unresolved
        .extend(skipped.iter().map(|s| format!("not fixable: {s}")));
    let outcome = match options.repair {
        None if nan + inf > 0 => StepOutcome::skipped(format!(
            "repair not asked for: {} non-finite values left as they are",
            nan + inf
        )),
        None => StepOutcome::skipped("no repair asked for"),
        Some(_) if nan + inf == 0 => StepOutcome::skipped("nothing to repair"),
        Some(mode) => StepOutcome::ok(
            format!(
                "{} values set ({mode:?}) in {} tensors{}",
                sum(&|f| f.repaired_values),
                count(&|f| f.repaired_values > 0),
                if skipped.is_empty() {
                    String::new()
                } else {
                    format!("; not fixable: {}", skipped.join(", "))
                }
            ),
            sum(&|f| f.repair_bytes),
        ),
    };
    report.push("repair", Tier::Memory, started, outcome);
    let outcome = match options.outlier_sigmas {
        None => StepOutcome::skipped("no outlier clamp asked for"),
        Some(k) => StepOutcome::ok(
            format!(
                "{} values beyond mean +/- {k} sd clamped in {} tensors",
                sum(&|f| f.clamped_values),
                count(&|f| f.clamped_values > 0)
            ),
            sum(&|f| f.clamp_bytes),
        ),
    };
    report.push("outlier_clamp", Tier::Memory, started, outcome);
    Ok(Some(
        fixes
            .into_iter()
            .filter_map(|(shard, t, f)| {
                f.write.map(|(offset, bytes)| PlannedFix {
                    shard,
                    name: t.name.clone(),
                    offset,
                    bytes,
                })
            })
            .collect(),
    ))
}

/// A safety run planned by [`Manager::plan_safety`]: the report of the steps that plan
/// (integrity, scan, repair, clamp) and the repairs as one memory-tier transaction plan.
/// Serialized, it is the report's fields and the plan's.
#[derive(Debug, Serialize)]
pub struct SafetyPlan {
    /// The report so far.
    #[serde(flatten)]
    pub report: PipelineReport,
    /// The repairs.
    #[serde(flatten)]
    pub memory: PatchPlan,
    #[serde(skip)]
    proceed: bool,
    #[serde(skip)]
    model: ModelId,
}

impl SafetyPlan {
    /// Binds the plan to the manager and options that apply it, as a
    /// `byte_tier::plan::Plan`.
    pub fn on<'a>(self, manager: &'a Manager, options: &'a SafetyOptions) -> BoundSafetyPlan<'a> {
        BoundSafetyPlan {
            manager,
            options,
            plan: self,
        }
    }
}

/// A [`SafetyPlan`] with what applies it: reported as the plan, applied by
/// [`Manager::apply_safety`].
#[derive(Debug, Serialize)]
pub struct BoundSafetyPlan<'a> {
    #[serde(skip)]
    manager: &'a Manager,
    #[serde(skip)]
    options: &'a SafetyOptions,
    #[serde(flatten)]
    plan: SafetyPlan,
}

impl BoundSafetyPlan<'_> {
    /// The plan.
    pub fn plan(&self) -> &SafetyPlan {
        &self.plan
    }
}

impl byte_tier::plan::Plan for BoundSafetyPlan<'_> {
    type Applied = PipelineReport;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.plan.memory.is_noop()
    }

    fn apply(self) -> Result<PipelineReport> {
        self.manager.apply_safety(self.plan, self.options)
    }
}

/// A safety run over a shard set, planned by [`Manager::plan_safety_of_set`]: the report
/// of the planning steps and the repairs, each in the shard that holds its tensor, to be
/// written as one set transaction (all shards or none, recovered as a unit).
#[derive(Debug, Serialize)]
pub struct SetSafetyPlan {
    /// The report so far.
    #[serde(flatten)]
    pub report: PipelineReport,
    /// `"in_place_set"`.
    pub kind: &'static str,
    /// Every shard of the set, in order.
    pub shards: Vec<PathBuf>,
    /// The tensors repaired, by name.
    pub tensors: Vec<String>,
    /// Bytes the repairs write: those that change.
    pub bytes: u64,
    /// What the plan was made from: each shard it writes, with its header and the
    /// ranges it rewrites.
    pub stamps: Vec<FileStamp>,
    #[serde(skip)]
    writes: Vec<ShardWrites>,
    #[serde(skip)]
    proceed: bool,
}

impl SetSafetyPlan {
    /// Binds the plan to the manager (for its server) and options that apply it, as a
    /// `byte_tier::plan::Plan`.
    pub fn on<'a>(
        self,
        manager: &'a Manager,
        options: &'a SafetyOptions,
    ) -> BoundSetSafetyPlan<'a> {
        BoundSetSafetyPlan {
            manager,
            options,
            plan: self,
        }
    }
}

/// A [`SetSafetyPlan`] with what applies it: reported as the plan, applied by
/// [`Manager::apply_safety_of_set`].
#[derive(Debug, Serialize)]
pub struct BoundSetSafetyPlan<'a> {
    #[serde(skip)]
    manager: &'a Manager,
    #[serde(skip)]
    options: &'a SafetyOptions,
    #[serde(flatten)]
    plan: SetSafetyPlan,
}

impl byte_tier::plan::Plan for BoundSetSafetyPlan<'_> {
    type Applied = PipelineReport;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.plan.writes.is_empty()
    }

    fn apply(self) -> Result<PipelineReport> {
        self.manager.apply_safety_of_set(self.plan, self.options)
    }
}

impl Manager {
    /// Runs the safety pipeline on the model attached as `id`: integrity check against a
    /// manifest (when given; a mismatch stops the run before anything is written), NaN
    /// and infinity scan of every tensor, repair and outlier clamp as asked (one
    /// memory-tier transaction), then the default server rules when a server is
    /// attached. A failed step undoes the steps before it.
    pub fn safety(&self, id: ModelId, options: &SafetyOptions) -> Result<PipelineReport> {
        let plan = self.plan_safety(id, options)?;
        self.apply_safety(plan, options)
    }

    /// The planning steps of [`Manager::safety`] (integrity, scan, repair, clamp): the
    /// report so far and the repairs as one transaction plan; nothing is written.
    pub fn plan_safety(&self, id: ModelId, options: &SafetyOptions) -> Result<SafetyPlan> {
        let (path, _) = self.source(id)?;
        let mut report = PipelineReport::new("safety", path.unwrap_or_default(), options.dry_run);
        let (memory, proceed) = self
            .change(id, |live| plan_repairs(live, options, &mut report))?
            .0;
        Ok(SafetyPlan {
            report,
            memory,
            proceed,
            model: id,
        })
    }

    /// The write and server steps of [`Manager::safety`]: writes the plan's repairs as
    /// they were planned (refused when the model changed since; nothing in a dry run),
    /// then adds the server rules. A failed step undoes the steps before it.
    pub fn apply_safety(
        &self,
        plan: SafetyPlan,
        options: &SafetyOptions,
    ) -> Result<PipelineReport> {
        let SafetyPlan {
            mut report,
            memory,
            proceed,
            model: id,
        } = plan;
        if !proceed {
            return Ok(report);
        }
        let started = Instant::now();
        let planned: u64 = report
            .steps
            .iter()
            .filter(|s| s.step == "repair" || s.step == "outlier_clamp")
            .map(|s| s.bytes)
            .sum();
        let count = memory.patches.len();
        let outcome = if count == 0 {
            StepOutcome::skipped("nothing to write")
        } else if options.dry_run {
            StepOutcome::skipped(format!(
                "dry run: {count} patches would change {planned} bytes"
            ))
        } else {
            let (ids, transaction) = self
                .change(id, |live| {
                    let ids: Vec<_> = live
                        .apply_planned(memory)?
                        .into_iter()
                        .map(|r| r.id)
                        .collect();
                    let transaction = ids.first().and_then(|id| live.journal_transaction(*id));
                    Ok((ids, transaction))
                })?
                .0;
            report.undo.journal_transaction = transaction;
            report.undo.memory_patches = ids;
            StepOutcome::ok(
                format!(
                    "{count} patches in one transaction{}",
                    transaction.map_or(String::new(), |t| format!(" (journal transaction {t})"))
                ),
                planned,
            )
        };
        report.push("write", Tier::Memory, started, outcome);

        self.push_server_rules(options, &mut report);
        if !report.succeeded() {
            let patches = std::mem::take(&mut report.undo.memory_patches);
            self.change(id, |live| {
                for patch in patches.iter().rev() {
                    live.revert(*patch)?;
                }
                Ok(())
            })?;
            report.undo = Default::default();
            return Ok(report);
        }
        self.completed(&report);
        Ok(report)
    }

    /// The planning steps of [`Manager::safety`] over the shard set `any_shard` belongs
    /// to, reported once for the whole model (the manifest is the set's, as `verify`
    /// writes it): the repairs, each in its shard, as one set transaction. Nothing is
    /// written.
    pub fn plan_safety_of_set(
        &self,
        any_shard: &Path,
        options: &SafetyOptions,
    ) -> Result<SetSafetyPlan> {
        let set = byte_tier::split::ShardSet::open(any_shard)?;
        let parsed = set.parse_all()?;
        let shards: Vec<PathBuf> = set.files().iter().map(|f| f.path().to_owned()).collect();
        let mut report = PipelineReport::new(
            "safety",
            shards.first().cloned().unwrap_or_default(),
            options.dry_run,
        );
        let fixes = plan_fixes(&parsed, options, &mut report)?;
        let proceed = fixes.is_some();
        let fixes = fixes.unwrap_or_default();
        let mut writes = Vec::new();
        let mut stamps = Vec::new();
        for (index, (file, gguf)) in set.files().iter().zip(&parsed).enumerate() {
            let part: Vec<&PlannedFix> = fixes.iter().filter(|f| f.shard == index).collect();
            if part.is_empty() {
                continue;
            }
            let ranges = std::iter::once(0..gguf.data_offset()).chain(
                part.iter()
                    .map(|f| f.offset..f.offset + f.bytes.len() as u64),
            );
            stamps.push(FileStamp::take(file.path(), file.bytes(), ranges)?);
            writes.push(ShardWrites {
                shard: file.path().to_owned(),
                writes: part
                    .iter()
                    .flat_map(|f| {
                        // A repair's span holds many unchanged blocks, which are neither
                        // written nor journaled.
                        let start = f.offset as usize;
                        let old = &gguf.bytes()[start..start + f.bytes.len()];
                        byte_tier::tensor_edit::changed_runs(old, &f.bytes, f.offset)
                    })
                    .collect(),
                reverts: None,
            });
        }
        Ok(SetSafetyPlan {
            report,
            kind: "in_place_set",
            shards,
            tensors: fixes.iter().map(|f| f.name.clone()).collect(),
            bytes: writes
                .iter()
                .flat_map(|w| &w.writes)
                .map(|w| w.bytes.len() as u64)
                .sum(),
            stamps,
            writes,
            proceed,
        })
    }

    /// The write and server steps of a set's safety run: the repairs as one set
    /// transaction, as they were planned (refused when a shard changed since; nothing in
    /// a dry run), then the server rules. A failed step undoes the steps before it.
    pub fn apply_safety_of_set(
        &self,
        plan: SetSafetyPlan,
        options: &SafetyOptions,
    ) -> Result<PipelineReport> {
        let SetSafetyPlan {
            mut report,
            shards,
            tensors,
            stamps,
            writes,
            proceed,
            ..
        } = plan;
        if !proceed {
            return Ok(report);
        }
        let Some(first) = shards.first() else {
            return Ok(report);
        };
        let started = Instant::now();
        let count = tensors.len();
        let planned: u64 = writes
            .iter()
            .flat_map(|w| &w.writes)
            .map(|w| w.bytes.len() as u64)
            .sum();
        let outcome = if count == 0 {
            StepOutcome::skipped("nothing to write")
        } else if options.dry_run {
            StepOutcome::skipped(format!(
                "dry run: repairs of {count} tensors in {} shards would write {planned} bytes",
                writes.len()
            ))
        } else {
            for (stamp, part) in stamps.iter().zip(&writes) {
                let map = byte_tier::MappedFile::open(&part.shard)?;
                stamp.check(map.bytes())?;
            }
            let parts = writes.len();
            let receipt = run_set_transaction(first, "safety", None, writes)?;
            report.undo.set_transaction = receipt.transaction;
            StepOutcome::ok(
                format!(
                    "repairs of {count} tensors in {parts} shards, one set transaction{}",
                    receipt
                        .transaction
                        .map_or(String::new(), |t| format!(" ({t} in the set's journal)"))
                ),
                planned,
            )
        };
        report.push("write", Tier::Byte, started, outcome);
        self.push_server_rules(options, &mut report);
        if !report.succeeded() {
            if let Some(id) = report.undo.set_transaction.take() {
                revert_set_transaction(first, id)?;
            }
            report.undo = Default::default();
            return Ok(report);
        }
        self.completed(&report);
        Ok(report)
    }

    /// The pipeline's last step: the default server rules, added to an attached server
    /// unless this is a dry run.
    fn push_server_rules(&self, options: &SafetyOptions, report: &mut PipelineReport) {
        let started = Instant::now();
        let outcome = match (self.server(), &options.server) {
            (None, _) => StepOutcome::skipped("no server attached"),
            (Some(_), None) => StepOutcome::skipped("no server rules asked for"),
            (Some(_), Some(_)) if options.dry_run => {
                StepOutcome::skipped("dry run: server rules not added")
            }
            (Some(server), Some(defaults)) => {
                let rules: Vec<Rule> = default_safety_rules(defaults);
                match self.add_rules(server.as_ref(), rules) {
                    Ok((added, present)) => {
                        let text = format!(
                            "rules added: {}{}",
                            if added.is_empty() {
                                "none".to_owned()
                            } else {
                                added.join(", ")
                            },
                            if present.is_empty() {
                                String::new()
                            } else {
                                format!("; already present: {}", present.join(", "))
                            }
                        );
                        report.undo.server_rules = added;
                        StepOutcome::ok(text, 0)
                    }
                    Err(error) => StepOutcome::failed("no rules added", error.to_string()),
                }
            }
        };
        report.push("server_rules", Tier::Server, started, outcome);
    }

    /// Adds rules to a server, leaving those whose name it already has; on a refusal the
    /// ones added are removed again. Returns the names added and those already present.
    pub(crate) fn add_rules(
        &self,
        server: &dyn crate::server::ServerLink,
        rules: Vec<Rule>,
    ) -> Result<(Vec<String>, Vec<String>)> {
        let existing: Vec<String> = server.rules()?.into_iter().map(|r| r.name).collect();
        let (mut added, mut present): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
        for rule in rules {
            if existing.contains(&rule.name) {
                present.push(rule.name);
                continue;
            }
            let name = rule.name.clone();
            if let Err(error) = server.add_rule(rule) {
                let rollback: Vec<String> = added
                    .iter()
                    .rev()
                    .filter_map(|added| {
                        server
                            .remove_rule(added)
                            .err()
                            .map(|e| format!("removing rule {added:?}: {e}"))
                    })
                    .collect();
                let error = Error::Server(format!("rule {name:?}: {error}"));
                if rollback.is_empty() {
                    return Err(error);
                }
                return Err(Error::RollbackFailed {
                    error: Box::new(error),
                    rollback,
                });
            }
            added.push(name);
        }
        Ok((added, present))
    }
}

#[cfg(test)]
mod tests;
