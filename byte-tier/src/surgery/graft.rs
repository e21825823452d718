//! Grafting: a tensor of another model added to a rewrite of this one (a `rope_freqs`,
//! an MTP / nextn head), after checks that it fits.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use serde::Serialize;

use crate::edit::split_block_name;
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::types::GgmlType;
use crate::writer::{GgufWriter, TensorData, TensorSpec};

/// What a graft added.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GraftReport {
    /// The tensor's name in the source.
    pub source_name: String,
    /// Its name in the destination.
    pub name: String,
    /// Its dimensions.
    pub dims: Vec<u64>,
    /// Its type (kept).
    pub ggml_type: GgmlType,
    /// Its byte count.
    pub bytes: u64,
    /// A tensor of the same kind in another block of the destination whose shape it
    /// matches, when there is one (`blk.N.attn_q.weight` for `blk.M.attn_q.weight`).
    pub matched_sibling: Option<String>,
    /// Things a user should know that did not stop the graft (a sibling of another type).
    pub notes: Vec<String>,
}

/// The embedding length of a parsed model, when it has one.
fn n_embd(gguf: &Gguf<'_>) -> Option<u64> {
    let arch = gguf.architecture()?;
    gguf.get_u64(&format!("{arch}.embedding_length")).ok()
}

/// Adds the tensor `name` of `source` (a model mapped from `source_path`) to the rewrite
/// `writer` of `destination`, under `as_name` (its own name by default), keeping its
/// type and bytes. Its data is streamed from `source_path` when the file is written.
///
/// Checks, all before anything is written:
/// - the name is free in the destination ([`Error::TensorExists`]);
/// - a per-block name (`blk.N.*`) names a block the destination has;
/// - when both models give their embedding length and they differ, no dimension of the
///   tensor is the source's embedding length (it would not fit the destination's
///   residual stream);
/// - when the destination has tensors of the same kind in other blocks, the shape is
///   theirs (a type that differs is only noted: llama.cpp takes any type per tensor).
pub fn copy_tensor<'a>(
    source: &Gguf<'_>,
    source_path: &Path,
    name: &str,
    destination: &Gguf<'a>,
    writer: &mut GgufWriter<'a>,
    as_name: Option<&str>,
) -> Result<GraftReport> {
    let info = source.require_tensor(name)?;
    let new_name = as_name.unwrap_or(name);
    let mismatch = |reason: String| Error::GraftMismatch {
        tensor: new_name.to_owned(),
        reason,
    };
    if writer.tensors().iter().any(|t| t.name == new_name) {
        return Err(Error::TensorExists(new_name.to_owned()));
    }
    let mut notes = Vec::new();
    let mut matched_sibling = None;
    if let Some((index, rest)) = split_block_name(new_name) {
        let arch = destination.architecture().unwrap_or_default();
        let blocks = destination.get_u64(&format!("{arch}.block_count")).ok();
        if let Some(blocks) = blocks
            && index >= blocks
        {
            return Err(mismatch(format!(
                "it names block {index}, but the destination has {blocks} blocks"
            )));
        }
        let sibling = destination
            .tensors()
            .iter()
            .find(|t| split_block_name(&t.name).is_some_and(|(i, r)| r == rest && i != index));
        if let Some(sibling) = sibling {
            if sibling.dims != info.dims {
                return Err(mismatch(format!(
                    "its shape {:?} differs from {:?} of {:?}",
                    info.dims, sibling.dims, sibling.name
                )));
            }
            if sibling.ggml_type != info.ggml_type {
                notes.push(format!(
                    "it is {}, {:?} is {}",
                    info.ggml_type, sibling.name, sibling.ggml_type
                ));
            }
            matched_sibling = Some(sibling.name.clone());
        }
    }
    if let (Some(from), Some(to)) = (n_embd(source), n_embd(destination))
        && from != to
        && info.dims.contains(&from)
    {
        return Err(mismatch(format!(
            "its shape {:?} holds the source's embedding length {from}; the destination's is {to}",
            info.dims
        )));
    }
    let mut file =
        File::open(source_path).map_err(|e| Error::io("open graft source", source_path, e))?;
    file.seek(SeekFrom::Start(info.data_offset))
        .map_err(|e| Error::io("seek graft source", source_path, e))?;
    writer.add_tensor(TensorSpec {
        name: new_name.to_owned(),
        dims: info.dims.clone(),
        ggml_type: info.ggml_type,
        data: TensorData::Reader(Box::new(file.take(info.n_bytes))),
    });
    Ok(GraftReport {
        source_name: name.to_owned(),
        name: new_name.to_owned(),
        dims: info.dims.clone(),
        ggml_type: info.ggml_type,
        bytes: info.n_bytes,
        matched_sibling,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(n_embd: u32, tensors: &[(&str, Vec<u64>, GgmlType)]) -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.set("general.architecture", "toy")
            .set("toy.block_count", 2u32)
            .set("toy.embedding_length", n_embd);
        for (name, dims, t) in tensors {
            let n: u64 = dims.iter().product();
            let bytes = vec![7u8; t.bytes_for(n).unwrap() as usize];
            w.add_tensor(TensorSpec::from_bytes(*name, dims.clone(), *t, bytes));
        }
        let mut out = Vec::new();
        w.write_to(&mut out).unwrap();
        out
    }

    fn graft(
        source: &[u8],
        destination: &[u8],
        name: &str,
        as_name: Option<&str>,
    ) -> Result<(Vec<u8>, GraftReport)> {
        let dir = tempfile::tempdir().unwrap();
        let source_path = dir.path().join("source.gguf");
        std::fs::write(&source_path, source).unwrap();
        let src = Gguf::parse(source)?;
        let dst = Gguf::parse(destination)?;
        let mut writer = GgufWriter::from_gguf(&dst);
        let report = copy_tensor(&src, &source_path, name, &dst, &mut writer, as_name)?;
        let mut out = Vec::new();
        writer.write_to(&mut out)?;
        Ok((out, report))
    }

    #[test]
    fn a_grafted_tensor_keeps_its_type_and_bytes() {
        let source = model(
            64,
            &[
                ("rope_freqs.weight", vec![32], GgmlType::F32),
                ("blk.0.attn_q.weight", vec![64, 64], GgmlType::Q8_0),
            ],
        );
        let destination = model(64, &[("blk.0.attn_q.weight", vec![64, 64], GgmlType::Q8_0)]);
        let (out, report) = graft(&source, &destination, "rope_freqs.weight", None).unwrap();
        let gguf = Gguf::parse(&out).unwrap();
        let t = gguf.tensor("rope_freqs.weight").unwrap();
        assert_eq!((t.ggml_type, t.dims.clone()), (GgmlType::F32, vec![32]));
        assert_eq!(gguf.tensor_data(t), &[7u8; 128]);
        assert_eq!(report.matched_sibling, None);

        let (out, report) = graft(
            &source,
            &destination,
            "blk.0.attn_q.weight",
            Some("blk.1.attn_q.weight"),
        )
        .unwrap();
        assert_eq!(
            report.matched_sibling.as_deref(),
            Some("blk.0.attn_q.weight")
        );
        assert!(
            Gguf::parse(&out)
                .unwrap()
                .tensor("blk.1.attn_q.weight")
                .is_some()
        );
    }

    #[test]
    fn clashing_names_and_misfits_are_refused() {
        let source = model(
            64,
            &[
                ("blk.0.attn_q.weight", vec![64, 32], GgmlType::Q8_0),
                ("blk.0.ffn_up.weight", vec![64, 64], GgmlType::F32),
            ],
        );
        let destination = model(64, &[("blk.0.attn_q.weight", vec![64, 64], GgmlType::Q8_0)]);
        assert!(matches!(
            graft(&source, &destination, "blk.0.attn_q.weight", None),
            Err(Error::TensorExists(name)) if name == "blk.0.attn_q.weight"
        ));
        assert!(matches!(
            graft(
                &source,
                &destination,
                "blk.0.attn_q.weight",
                Some("blk.1.attn_q.weight")
            ),
            Err(Error::GraftMismatch { .. })
        ));
        assert!(matches!(
            graft(
                &source,
                &destination,
                "blk.0.ffn_up.weight",
                Some("blk.7.ffn_up.weight")
            ),
            Err(Error::GraftMismatch { .. })
        ));
        let wider = model(
            128,
            &[("blk.0.attn_q.weight", vec![128, 128], GgmlType::Q8_0)],
        );
        assert!(matches!(
            graft(
                &source,
                &wider,
                "blk.0.ffn_up.weight",
                Some("blk.1.ffn_up.weight")
            ),
            Err(Error::GraftMismatch { .. })
        ));
        assert!(matches!(
            graft(&source, &destination, "missing", None),
            Err(Error::NoSuchTensor(_))
        ));
    }
}
