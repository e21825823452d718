//! The embedded default model: a small llama-shaped GGUF generated on the spot, so that
//! the main job runs with no download.

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
            block_count: 2,
            embedding_length: 256,
            feed_forward_length: 512,
            vocab_size: 64,
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

    let matrix = |name: String, cols: u64, rows: u64, noise: &mut Noise| {
        let bytes = f32_bytes((cols * rows) as usize, 0.05, 0.0, noise);
        TensorSpec::from_bytes(name, vec![cols, rows], GgmlType::F32, bytes)
    };
    w.add_tensor(matrix("token_embd.weight".into(), d, vocab, &mut noise));
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
        for proj in ["attn_q", "attn_k", "attn_v", "attn_output"] {
            w.add_tensor(matrix(format!("blk.{b}.{proj}.weight"), d, d, &mut noise));
        }
        w.add_tensor(norm("ffn_norm.weight", &mut noise));
        w.add_tensor(matrix(
            format!("blk.{b}.ffn_gate.weight"),
            d,
            ff,
            &mut noise,
        ));
        w.add_tensor(matrix(format!("blk.{b}.ffn_up.weight"), d, ff, &mut noise));
        w.add_tensor(matrix(
            format!("blk.{b}.ffn_down.weight"),
            ff,
            d,
            &mut noise,
        ));
    }
    w.add_tensor(TensorSpec::from_bytes(
        "output_norm.weight",
        vec![d],
        GgmlType::F32,
        f32_bytes(d as usize, 0.1, 1.0, &mut noise),
    ));
    w.add_tensor(matrix("output.weight".into(), d, vocab, &mut noise));
    w.write_to_path(&path)?;
    Ok(path)
}
