//! The embedded default model: a small llama-shaped GGUF generated on the spot, so that
//! the main job runs with no download. Its tensors mix the common storage types: F32
//! norms and down projections, F16 embeddings and attention value/output projections,
//! Q8_0 query/key projections and the output head, and Q4_K gate/up projections.

use std::path::{Path, PathBuf};

use byte_tier::{Array, GgmlType, GgufWriter, TensorSpec, Value, ValueType};

/// Shape of the generated model.
#[derive(Clone, Copy, Debug)]
pub struct DemoShape {
    /// Transformer blocks.
    pub block_count: u32,
    /// Width of the residual stream (a multiple of 256, so K-quants fit).
    pub embedding_length: u32,
    /// Width of the feed-forward layer.
    pub feed_forward_length: u32,
    /// Vocabulary size.
    pub vocab_size: u32,
}

impl Default for DemoShape {
    fn default() -> DemoShape {
        DemoShape {
            block_count: 4,
            embedding_length: 256,
            feed_forward_length: 512,
            vocab_size: 128,
        }
    }
}

/// A small deterministic generator (xorshift64*), so every run writes the same bytes.
struct Noise(u64);

impl Noise {
    fn next_f32(&mut self) -> f32 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let bits = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 40;
        // Uniform in [-1, 1).
        bits as f32 / (1u64 << 23) as f32 - 1.0
    }
}

fn f32_bytes(n: usize, scale: f32, bias: f32, noise: &mut Noise) -> Vec<u8> {
    let mut out = Vec::with_capacity(n * 4);
    for _ in 0..n {
        out.extend_from_slice(&(bias + scale * noise.next_f32()).to_le_bytes());
    }
    out
}

/// `n` noise values stored as `ggml_type`.
fn typed_bytes(
    ggml_type: GgmlType,
    n: usize,
    scale: f32,
    noise: &mut Noise,
) -> byte_tier::Result<Vec<u8>> {
    let values: Vec<f32> = (0..n).map(|_| scale * noise.next_f32()).collect();
    byte_tier::codec::quantize(ggml_type, &values)
}

/// Writes the demo model to `dir/demo-llama.gguf` and returns its path.
pub fn write_demo_model(dir: &Path, shape: DemoShape) -> byte_tier::Result<PathBuf> {
    let path = dir.join("demo-llama.gguf");
    let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
    let d = u64::from(shape.embedding_length);
    let ff = u64::from(shape.feed_forward_length);
    let vocab = u64::from(shape.vocab_size);

    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama")
        .set("general.name", "hotpatch demo")
        .set("llama.block_count", shape.block_count)
        .set("llama.context_length", 256u32)
        .set("llama.embedding_length", shape.embedding_length)
        .set("llama.feed_forward_length", shape.feed_forward_length)
        .set("llama.attention.head_count", 4u32)
        .set("llama.attention.head_count_kv", 4u32)
        .set("llama.rope.dimension_count", shape.embedding_length / 4)
        .set("llama.attention.layer_norm_rms_epsilon", 1e-5f32)
        .set("tokenizer.ggml.model", "llama");
    let tokens: Vec<String> = (0..shape.vocab_size)
        .map(|i| match i {
            0 => "<unk>".to_owned(),
            1 => "<s>".to_owned(),
            2 => "</s>".to_owned(),
            i => format!("tok{i}"),
        })
        .collect();
    w.set("tokenizer.ggml.tokens", Array::of_strings(tokens));
    w.set(
        "tokenizer.ggml.scores",
        Array::new(
            ValueType::F32,
            (0..shape.vocab_size)
                .map(|i| Value::F32(-(i as f32)))
                .collect(),
        ),
    );
    w.set(
        "tokenizer.ggml.token_type",
        Array::new(
            ValueType::I32,
            (0..shape.vocab_size)
                .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
                .collect(),
        ),
    );
    w.set("tokenizer.ggml.bos_token_id", 1u32)
        .set("tokenizer.ggml.eos_token_id", 2u32);

    let matrix = |name: String, ty: GgmlType, cols: u64, rows: u64, noise: &mut Noise| {
        typed_bytes(ty, (cols * rows) as usize, 0.05, noise)
            .map(|bytes| TensorSpec::from_bytes(name, vec![cols, rows], ty, bytes))
    };
    w.add_tensor(matrix(
        "token_embd.weight".into(),
        GgmlType::F16,
        d,
        vocab,
        &mut noise,
    )?);
    for b in 0..shape.block_count {
        let norm = |name: &str, noise: &mut Noise| {
            TensorSpec::from_bytes(
                format!("blk.{b}.{name}"),
                vec![d],
                GgmlType::F32,
                f32_bytes(d as usize, 0.1, 1.0, noise),
            )
        };
        w.add_tensor(norm("attn_norm.weight", &mut noise));
        for (proj, ty) in [
            ("attn_q", GgmlType::Q8_0),
            ("attn_k", GgmlType::Q8_0),
            ("attn_v", GgmlType::F16),
            ("attn_output", GgmlType::F16),
        ] {
            w.add_tensor(matrix(
                format!("blk.{b}.{proj}.weight"),
                ty,
                d,
                d,
                &mut noise,
            )?);
        }
        w.add_tensor(norm("ffn_norm.weight", &mut noise));
        for proj in ["ffn_gate", "ffn_up"] {
            w.add_tensor(matrix(
                format!("blk.{b}.{proj}.weight"),
                GgmlType::Q4_K,
                d,
                ff,
                &mut noise,
            )?);
        }
        w.add_tensor(matrix(
            format!("blk.{b}.ffn_down.weight"),
            GgmlType::F32,
            ff,
            d,
            &mut noise,
        )?);
    }
    w.add_tensor(TensorSpec::from_bytes(
        "output_norm.weight",
        vec![d],
        GgmlType::F32,
        f32_bytes(d as usize, 0.1, 1.0, &mut noise),
    ));
    w.add_tensor(matrix(
        "output.weight".into(),
        GgmlType::Q8_0,
        d,
        vocab,
        &mut noise,
    )?);
    w.write_to_path(&path)?;
    Ok(path)
}

/// One scene of the demo walk-through: a title and what happened.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Scene {
    /// What the scene shows.
    pub title: String,
    /// What happened, line by line.
    pub lines: Vec<String>,
}

fn f32_at(live: &memory_tier::LiveModel, tensor: &str, index: u64) -> crate::Result<f32> {
    let info = live.tensor(tensor)?;
    let start = info.data_offset + index * 4;
    let view = live.view(start..start + 4)?;
    let bytes: [u8; 4] = view
        .bytes()
        .try_into()
        .map_err(|_| crate::Error::Refused(format!("{tensor}: cannot read element {index}")))?;
    Ok(f32::from_le_bytes(bytes))
}

fn sha256_file(path: &Path) -> crate::Result<[u8; 32]> {
    let map = byte_tier::MappedFile::open(path)?;
    Ok(byte_tier::ops::sha256(map.bytes()))
}

/// Walks through the main job on the demo model at `model` (written by
/// [`write_demo_model`]): a live patch under page protection, a conflicting patch
/// refused, a transaction rolled back, a quantized-domain scale, the safety pipeline, a
/// diff, and a revert to byte-identical. A copy of the original is kept beside the model
/// as `demo-llama.original.gguf` for the diff. Each scene checks its own claim and fails
/// the walk-through when it does not hold.
pub fn walkthrough(model: &Path) -> crate::Result<Vec<Scene>> {
    use crate::manager::{Manager, Patch};
    use crate::safety::{Repair, SafetyOptions};
    use byte_tier::named::{BytePatch, PatchOperation, PatchTarget as ByteTarget};
    use memory_tier::{AttachMode, MemoryPatch, PatchTarget, Payload, ValueTransform};

    let fail = |what: String| crate::Error::Refused(format!("demo: {what}"));
    let mut scenes = Vec::new();
    let original = model.with_file_name("demo-llama.original.gguf");
    std::fs::copy(model, &original).map_err(|e| crate::Error::io("copy", model, e))?;
    let original_sha = sha256_file(&original)?;

    let manager = Manager::new();
    let id = manager.attach(model, AttachMode::Shared)?;
    let live = manager.model(id)?;

    // A live patch under page protection.
    let norm = "blk.0.attn_norm.weight";
    let before = f32_at(&live, norm, 0)?;
    let stats_before = live.stats();
    let scale = manager.apply(
        id,
        Patch::Memory(MemoryPatch::new(
            "halve-attn-norm",
            PatchTarget::Tensor {
                name: norm.into(),
                elements: None,
            },
            Payload::Transform(ValueTransform::Scale(0.5)),
        )),
    )?;
    let after = f32_at(&live, norm, 0)?;
    let stats = live.stats();
    if after != before * 0.5 {
        return Err(fail(format!(
            "{norm}[0] is {after}, expected {}",
            before * 0.5
        )));
    }
    scenes.push(Scene {
        title: "A live patch under page protection".into(),
        lines: vec![
            format!("attached {} as a shared mapping, read-only to this process", model.display()),
            format!("scaled {norm} by 0.5: element 0 went {before} -> {after}"),
            format!(
                "{} writable window opened and closed ({} protection changes); the journal recorded transaction {}",
                stats.windows_opened - stats_before.windows_opened,
                stats.protection_calls - stats_before.protection_calls,
                scale.journal_transaction.map_or("-".into(), |t| t.to_string())
            ),
        ],
    });

    // A conflicting patch.
    let conflict = manager.apply(
        id,
        Patch::Memory(MemoryPatch::new(
            "zero-attn-norm",
            PatchTarget::Tensor {
                name: norm.into(),
                elements: Some(0..32),
            },
            Payload::Transform(ValueTransform::Zero),
        )),
    );
    let refused = match conflict {
        Err(crate::Error::Memory(e @ memory_tier::Error::Conflict { .. })) => e.to_string(),
        Err(other) => {
            return Err(fail(format!(
                "the conflicting patch failed otherwise: {other}"
            )));
        }
        Ok(_) => {
            return Err(fail(
                "a conflicting patch of equal priority was applied".into(),
            ));
        }
    };
    scenes.push(Scene {
        title: "A conflicting patch refused".into(),
        lines: vec![
            "zeroing elements 0..32 of the same tensor at the same priority:".into(),
            format!("refused: {refused}"),
        ],
    });

    // A transaction rolled back.
    let bytes_before = live.read().bytes().to_vec();
    let result = manager.apply_all(
        id,
        vec![
            Patch::Memory(MemoryPatch::new(
                "double-ffn-norm",
                PatchTarget::Tensor {
                    name: "blk.1.ffn_norm.weight".into(),
                    elements: None,
                },
                Payload::Transform(ValueTransform::Scale(2.0)),
            )),
            Patch::Memory(MemoryPatch::new(
                "offset-attn-q",
                PatchTarget::Tensor {
                    name: "blk.1.attn_q.weight".into(),
                    elements: None,
                },
                Payload::Transform(ValueTransform::Offset(0.01)),
            )),
            Patch::Memory(MemoryPatch::new(
                "half-a-block",
                PatchTarget::Tensor {
                    name: "blk.1.ffn_up.weight".into(),
                    elements: Some(0..100),
                },
                Payload::Transform(ValueTransform::Zero),
            )),
        ],
    );
    let reason = match result {
        Err(e) => e.to_string(),
        Ok(_) => {
            return Err(fail(
                "a transaction with an unaligned range was applied".into(),
            ));
        }
    };
    if live.read().bytes() != &bytes_before[..] {
        return Err(fail(
            "the rolled-back transaction left bytes changed".into(),
        ));
    }
    drop(bytes_before);
    scenes.push(Scene {
        title: "A transaction rolled back".into(),
        lines: vec![
            "three patches as one transaction; the third covers elements 0..100 of a Q4_K tensor (blocks are 256):".into(),
            format!("{reason}"),
            "every byte of the region is as it was before the transaction".into(),
        ],
    });

    // A quantized-domain scale.
    let gate = "blk.0.ffn_gate.weight";
    let plan = {
        let guard = live.read();
        let gguf = byte_tier::Gguf::parse(guard.bytes())?;
        byte_tier::tensor_edit::plan_transform(
            &gguf,
            gate,
            None,
            &byte_tier::codec::Transform::Scale(0.5),
        )?
    };
    let info = live.tensor(gate)?.clone();
    manager.apply(
        id,
        Patch::Memory(MemoryPatch::new(
            "halve-ffn-gate",
            PatchTarget::Tensor {
                name: gate.into(),
                elements: None,
            },
            Payload::Transform(ValueTransform::Scale(0.5)),
        )),
    )?;
    scenes.push(Scene {
        title: "A quantized-domain scale".into(),
        lines: vec![
            format!(
                "scaled {gate} ({}, {} bytes) by 0.5 on its block scales alone ({:?} path): {} bytes changed",
                info.ggml_type.name(),
                info.n_bytes,
                plan.report.path,
                plan.changed_bytes
            ),
            format!(
                "error against exact scaling: rms {:.2e}, max {:.2e} (no requantization)",
                plan.report.rms_error, plan.report.max_abs_error
            ),
        ],
    });

    // The safety pipeline, after a NaN is planted.
    let down = "blk.2.ffn_down.weight";
    manager.apply(
        id,
        Patch::Byte(BytePatch {
            id: "plant-nan".into(),
            name: "plant-nan".into(),
            description: "a NaN for the safety pipeline to find".into(),
            target: ByteTarget::Tensor {
                tensor: down.into(),
                start: 40,
                end: 44,
            },
            operation: PatchOperation::Write {
                hex: "0000c07f".into(),
            },
            expected: None,
            priority: 0,
        }),
    )?;
    let report = manager.safety(
        id,
        &SafetyOptions {
            repair: Some(Repair::Zero),
            ..SafetyOptions::default()
        },
    )?;
    if !report.succeeded() || f32_at(&live, down, 10)? != 0.0 {
        return Err(fail(
            "the safety pipeline did not repair the planted NaN".into(),
        ));
    }
    // The repair lies over the planted patch: the NaN is gone while the repair is
    // applied, and reverting the repair would bring the planted patch's bytes back.
    let displaced = live
        .applied_patches()
        .iter()
        .any(|a| a.patch.name == "plant-nan" && !a.covered_by.is_empty());
    if !displaced {
        return Err(fail(
            "the repair did not displace the byte patch it repaired".into(),
        ));
    }
    let mut lines = vec![format!(
        "planted a NaN at {down}[10] with a byte patch; then:"
    )];
    for step in &report.steps {
        let status = match &step.result {
            crate::report::StepResult::Ok => "ok".to_owned(),
            crate::report::StepResult::Skipped(why) => format!("skipped: {why}"),
            crate::report::StepResult::Failed(why) => format!("FAILED: {why}"),
        };
        lines.push(format!(
            "  {:<14} {:<7} {:>9} B  {}  [{status}]",
            step.step,
            format!("{:?}", step.tier).to_lowercase(),
            step.bytes,
            step.changed
        ));
    }
    lines.push(
        "the repair (a higher priority) lies over the byte patch that planted the NaN; reverting the repair would bring it back".into(),
    );
    scenes.push(Scene {
        title: "The safety pipeline".into(),
        lines,
    });

    // A diff against the original.
    let diff = {
        let a = byte_tier::MappedFile::open(&original)?;
        let b = byte_tier::MappedFile::open(model)?;
        byte_tier::diff::diff(&a.parse()?, &b.parse()?)
    };
    let mut lines = vec![format!(
        "{} tensors changed, {} unchanged; no keys changed: {}",
        diff.tensors_changed.len(),
        diff.tensors_unchanged,
        diff.keys_changed.is_empty()
    )];
    for change in &diff.tensors_changed {
        lines.push(format!(
            "  {:<24} {:>6} bytes differ, relative rms change {}",
            change.name,
            change.bytes_changed,
            match (change.rms, change.rms_a) {
                (Some(rms), Some(a)) if a > 0.0 => format!("{:.3}", rms / a),
                _ => "n/a (non-finite values)".to_owned(),
            }
        ));
    }
    scenes.push(Scene {
        title: "A diff against the original".into(),
        lines,
    });

    // Revert everything: the repair first (the planted NaN comes back with the patch
    // under it), then the patches.
    manager.revert_pipeline(id, &report)?;
    for name in ["plant-nan", "halve-ffn-gate", "halve-attn-norm"] {
        manager.revert_by_name(id, name)?;
    }
    drop(live);
    manager.detach_all(false)?;
    let identical = sha256_file(model)? == original_sha;
    if !identical {
        return Err(fail("the reverted model differs from the original".into()));
    }
    let stats = manager.stats();
    scenes.push(Scene {
        title: "Revert to byte-identical".into(),
        lines: vec![
            "reverted the safety run as one unit, then both live patches".into(),
            format!(
                "SHA-256 of {} equals the original's: {identical}",
                model
                    .file_name()
                    .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
            ),
            format!(
                "manager: {} patches applied, {} reverted, {} bytes written, {} pipeline actions",
                stats.patches_applied,
                stats.patches_reverted,
                stats.bytes_modified,
                stats.actions_completed
            ),
        ],
    });
    Ok(scenes)
}
