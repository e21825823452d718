//! `cargo xtask iq-grids [GGML_COMMON_H]`: writes the lattice grids of the grid IQ types
//! (IQ1_S/IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) as data files that byte-tier's
//! codecs embed with `include_bytes!`.
//!
//! The grids are constants of the GGUF format: tables of points that ggml chose once and
//! that every reader must share. Their canonical text is ggml's `ggml-common.h`, as
//! `GGML_TABLE_BEGIN(type, name, size)` arrays of hexadecimal words whose bytes are the
//! coordinates of one point. This task reads those words and writes each table's bytes in
//! the order they have in memory on a little-endian machine (the order ggml indexes them
//! in), one byte per coordinate: `byte-tier/src/codec/grids/NAME.bin`.
//!
//! Without an argument the header comes from the llama.cpp source that
//! `cargo xtask llama-server` downloads.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The tables written: ggml's element type, name and number of points.
const TABLES: &[(&str, &str, usize)] = &[
    ("uint64_t", "iq2xxs_grid", 256),
    ("uint64_t", "iq2xs_grid", 512),
    ("uint64_t", "iq2s_grid", 1024),
    ("uint32_t", "iq3xxs_grid", 256),
    ("uint32_t", "iq3s_grid", 512),
    ("uint64_t", "iq1s_grid", 2048),
];

pub fn run(args: &[String]) -> Result<()> {
    let header = match args.first() {
        Some(path) => PathBuf::from(path),
        None => crate::llama_server::source_dir()?.join("ggml/src/ggml-common.h"),
    };
    let text = std::fs::read_to_string(&header)
        .with_context(|| format!("cannot read {}", header.display()))?;
    let out_dir = crate::workspace_root().join("byte-tier/src/codec/grids");
    std::fs::create_dir_all(&out_dir)?;
    for &(c_type, name, points) in TABLES {
        let bytes = table_bytes(&text, c_type, name, points)
            .with_context(|| format!("table {name} in {}", header.display()))?;
        let path = out_dir.join(format!("{name}.bin"));
        std::fs::write(&path, &bytes)?;
        eprintln!("{}: {} bytes", relative(&path), bytes.len());
    }
    Ok(())
}

fn relative(path: &Path) -> String {
    let root = crate::workspace_root();
    path.strip_prefix(&root)
        .unwrap_or(path)
        .display()
        .to_string()
}

/// The bytes of one table: every hexadecimal word between its `GGML_TABLE_BEGIN` and
/// the next `GGML_TABLE_END`, little-endian, at the width of its element type.
fn table_bytes(text: &str, c_type: &str, name: &str, points: usize) -> Result<Vec<u8>> {
    let width = match c_type {
        "uint64_t" => 8,
        "uint32_t" => 4,
        other => bail!("unexpected element type {other}"),
    };
    let begin = format!("GGML_TABLE_BEGIN({c_type}, {name}, ");
    let start = text.find(&begin).context("table not found")?;
    let body = &text[start..];
    let body = &body[body.find('\n').context("table has no body")?..];
    let end = body.find("GGML_TABLE_END()").context("table has no end")?;
    let mut bytes = Vec::with_capacity(points * width);
    for token in body[..end].split(|c: char| c == ',' || c.is_whitespace()) {
        if token.is_empty() {
            continue;
        }
        let digits = token
            .strip_prefix("0x")
            .with_context(|| format!("unexpected token {token:?}"))?;
        let word = u64::from_str_radix(digits, 16)
            .with_context(|| format!("unexpected token {token:?}"))?;
        bytes.extend_from_slice(&word.to_le_bytes()[..width]);
    }
    if bytes.len() != points * width {
        bail!(
            "expected {points} points of {width} bytes, found {} bytes",
            bytes.len()
        );
    }
    Ok(bytes)
}
