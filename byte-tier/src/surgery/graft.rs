//! Grafting: a tensor of another model added to a rewrite of this one (a `rope_freqs`,
//! an MTP / nextn head), after checks that it fits.

use std::fs::File;
use std::io::Write as _;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::edit::split_block_name;
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::plan::{FileStamp, Plan};
use crate::split::{OutputFile, SPLIT_TENSORS_COUNT_KEY, ShardSet, parse_shard_name, shard_path};
use crate::types::GgmlType;
use crate::value::Value;
use crate::writer::{GgufWriter, TensorData, TensorSpec, parent_dir, sync_dir};

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
    let source = GraftSource {
        holder: source,
        path: source_path,
        n_embd: n_embd(source),
    };
    copy_tensor_from(&source, name, destination, writer, as_name)
}

/// [`copy_tensor`] from a source that may be one shard of a set (its embedding length
/// read from the set's first shard).
pub fn copy_tensor_from<'a>(
    source: &GraftSource<'_>,
    name: &str,
    destination: &Gguf<'a>,
    writer: &mut GgufWriter<'a>,
    as_name: Option<&str>,
) -> Result<GraftReport> {
    let new_name = as_name.unwrap_or(name);
    if writer.tensors().iter().any(|t| t.name == new_name) {
        return Err(Error::TensorExists(new_name.to_owned()));
    }
    let (spec, report) = check_graft(source, name, destination, &[destination], as_name)?;
    writer.add_tensor(spec);
    Ok(report)
}

/// Where a grafted tensor comes from: the file that holds it (one shard of a set, or a
/// single file) and the source model's embedding length (from its first shard).
#[derive(Debug)]
pub struct GraftSource<'s> {
    /// The parsed file holding the tensor.
    pub holder: &'s Gguf<'s>,
    /// That file's path, read again when the destination is written.
    pub path: &'s Path,
    /// The source model's embedding length, when it gives one.
    pub n_embd: Option<u64>,
}

impl<'s> GraftSource<'s> {
    /// The source `holder` parsed from `path`, whose model metadata is in `first` (the
    /// same file, or the first shard of its set).
    pub fn new(holder: &'s Gguf<'s>, path: &'s Path, first: &Gguf<'_>) -> GraftSource<'s> {
        GraftSource {
            holder,
            path,
            n_embd: n_embd(first),
        }
    }
}

/// The checks of [`copy_tensor`] against a destination whose model metadata is in
/// `meta` and whose tensors are those of `parts` (every shard of a set), and the tensor
/// to add.
fn check_graft(
    source: &GraftSource<'_>,
    name: &str,
    meta: &Gguf<'_>,
    parts: &[&Gguf<'_>],
    as_name: Option<&str>,
) -> Result<(TensorSpec<'static>, GraftReport)> {
    let info = source.holder.require_tensor(name)?;
    let new_name = as_name.unwrap_or(name);
    let mismatch = |reason: String| Error::GraftMismatch {
        tensor: new_name.to_owned(),
        reason,
    };
    let tensors = || parts.iter().flat_map(|g| g.tensors());
    if tensors().any(|t| t.name == new_name) {
        return Err(Error::TensorExists(new_name.to_owned()));
    }
    let mut notes = Vec::new();
    let mut matched_sibling = None;
    if let Some((index, rest)) = split_block_name(new_name) {
        let arch = meta.architecture().unwrap_or_default();
        let blocks = meta.get_u64(&format!("{arch}.block_count")).ok();
        if let Some(blocks) = blocks
            && index >= blocks
        {
            return Err(mismatch(format!(
                "it names block {index}, but the destination has {blocks} blocks"
            )));
        }
        let sibling = tensors()
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
    if let (Some(from), Some(to)) = (source.n_embd, n_embd(meta))
        && from != to
        && info.dims.contains(&from)
    {
        return Err(mismatch(format!(
            "its shape {:?} holds the source's embedding length {from}; the destination's is {to}",
            info.dims
        )));
    }
    let mut file =
        File::open(source.path).map_err(|e| Error::io("open graft source", source.path, e))?;
    file.seek(SeekFrom::Start(info.data_offset))
        .map_err(|e| Error::io("seek graft source", source.path, e))?;
    let spec = TensorSpec {
        name: new_name.to_owned(),
        dims: info.dims.clone(),
        ggml_type: info.ggml_type,
        data: TensorData::Reader(Box::new(file.take(info.n_bytes))),
    };
    let report = GraftReport {
        source_name: name.to_owned(),
        name: new_name.to_owned(),
        dims: info.dims.clone(),
        ggml_type: info.ggml_type,
        bytes: info.n_bytes,
        matched_sibling,
        notes,
    };
    Ok((spec, report))
}

/// Adds the tensor `name` of `source` to a shard set: `shards` are the set's shards
/// parsed in order and `writers` their rewrites (one per shard, made with
/// [`GgufWriter::from_gguf`]). The tensor goes at the end of shard `target` (0-based),
/// and `split.tensors.count` grows by one in every shard, keeping its type; the checks
/// are [`copy_tensor`]'s, against the model metadata of the first shard and the tensors
/// of every shard.
pub fn copy_tensor_into_set<'a>(
    source: &GraftSource<'_>,
    name: &str,
    shards: &[Gguf<'a>],
    writers: &mut [GgufWriter<'a>],
    target: usize,
    as_name: Option<&str>,
) -> Result<GraftReport> {
    if shards.len() != writers.len() || shards.is_empty() {
        return Err(Error::InvalidEdit(format!(
            "{} shards and {} rewrites",
            shards.len(),
            writers.len()
        )));
    }
    if target >= shards.len() {
        return Err(Error::InvalidEdit(format!(
            "shard {} does not exist: the set has {} shards (numbered from 1)",
            target + 1,
            shards.len()
        )));
    }
    let parts: Vec<&Gguf<'_>> = shards.iter().collect();
    let (spec, report) = check_graft(source, name, &shards[0], &parts, as_name)?;
    for (shard, writer) in shards.iter().zip(writers.iter_mut()) {
        let count = shard
            .get(SPLIT_TENSORS_COUNT_KEY)
            .and_then(|v| v.as_u64())
            .ok_or_else(|| {
                Error::InvalidEdit(format!("a shard has no {SPLIT_TENSORS_COUNT_KEY}"))
            })?;
        let value = match shard.get(SPLIT_TENSORS_COUNT_KEY).map(|v| v.value_type()) {
            Some(crate::value::ValueType::U16) => u16::try_from(count + 1).map(Value::U16).ok(),
            Some(crate::value::ValueType::U32) => u32::try_from(count + 1).map(Value::U32).ok(),
            Some(crate::value::ValueType::U64) => Some(Value::U64(count + 1)),
            _ => i32::try_from(count + 1).map(Value::I32).ok(),
        }
        .ok_or_else(|| {
            Error::InvalidEdit(format!(
                "{} tensors overflow {SPLIT_TENSORS_COUNT_KEY}",
                count + 1
            ))
        })?;
        writer.set(SPLIT_TENSORS_COUNT_KEY, value);
    }
    writers[target].add_tensor(spec);
    Ok(report)
}

/// A graft into a shard set as a [`Plan`]: a new set (every shard rewritten, the tensor
/// in one of them, `split.tensors.count` one more in each), reported before anything is
/// written. `apply` writes every shard to a temporary file first and renames them into
/// place once all are complete, never over an existing file; it is refused with
/// [`Error::StalePlan`] when a shard of the set changed since the plan was made.
#[derive(Serialize)]
pub struct SetGraftPlan<'a> {
    kind: &'static str,
    /// The first shard of the destination set.
    file: PathBuf,
    /// The new set's shards, in order.
    files: Vec<OutputFile>,
    /// The new shard that holds the grafted tensor.
    target: PathBuf,
    /// What the graft adds.
    graft: GraftReport,
    #[serde(skip)]
    stamps: Vec<(FileStamp, &'a [u8])>,
    #[serde(skip)]
    writers: Vec<GgufWriter<'a>>,
}

/// The new set's prefix from `-o OUT`: OUT is the prefix (`OUT-0000K-of-0000N.gguf`
/// are written), or the name of the new set's first shard.
pub fn set_output_prefix(out: &Path, count: u32) -> Result<PathBuf> {
    match parse_shard_name(out) {
        Some(name) if name.index == 0 && name.count == count => Ok(name.prefix),
        Some(name) => Err(Error::InvalidEdit(format!(
            "{} names shard {} of {}; the new set has {count} shards: give its prefix or its first shard",
            out.display(),
            name.index + 1,
            name.count
        ))),
        None => Ok(out.to_owned()),
    }
}

impl std::fmt::Debug for SetGraftPlan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetGraftPlan")
            .field("file", &self.file)
            .field("files", &self.files)
            .field("target", &self.target)
            .field("graft", &self.graft)
            .finish_non_exhaustive()
    }
}

impl<'a> SetGraftPlan<'a> {
    /// Plans grafting `name` of `source` into `set` (parsed as `shards`), as a new set
    /// with prefix `out_prefix`, the tensor in shard `target` (0-based; the last when
    /// `None`). No output shard may exist already.
    pub fn new(
        set: &'a ShardSet,
        shards: &[Gguf<'a>],
        source: &GraftSource<'_>,
        name: &str,
        as_name: Option<&str>,
        target: Option<usize>,
        out_prefix: &Path,
    ) -> Result<SetGraftPlan<'a>> {
        let count = shards.len();
        let target = target.unwrap_or(count.saturating_sub(1));
        let mut writers: Vec<GgufWriter<'a>> = shards.iter().map(GgufWriter::from_gguf).collect();
        let graft = copy_tensor_into_set(source, name, shards, &mut writers, target, as_name)?;
        let mut files = Vec::with_capacity(count);
        for (index, writer) in writers.iter().enumerate() {
            let path = shard_path(out_prefix, index as u32, count as u32);
            if path.exists() {
                return Err(Error::OutputExists { path });
            }
            files.push(OutputFile {
                path,
                n_tensors: writer.tensors().len() as u64,
                n_bytes: writer.layout()?.file_len,
            });
        }
        let stamps = set
            .files()
            .iter()
            .zip(shards)
            .map(|(f, g)| {
                FileStamp::take(f.path(), f.bytes(), std::iter::once(0..g.data_offset()))
                    .map(|stamp| (stamp, f.bytes()))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(SetGraftPlan {
            kind: "new_files",
            file: set.files()[0].path().to_owned(),
            target: files[target].path.clone(),
            files,
            graft,
            stamps,
            writers,
        })
    }

    /// What the graft adds.
    pub fn report(&self) -> &GraftReport {
        &self.graft
    }
}

impl Plan for SetGraftPlan<'_> {
    type Applied = Vec<OutputFile>;
    type Error = Error;

    fn is_noop(&self) -> bool {
        false
    }

    fn apply(mut self) -> Result<Vec<OutputFile>> {
        for (stamp, bytes) in &self.stamps {
            stamp.check(bytes)?;
        }
        let mut pending = Vec::with_capacity(self.files.len());
        for (output, writer) in self.files.iter().zip(&mut self.writers) {
            let dir = parent_dir(&output.path);
            let mut temp = tempfile::Builder::new()
                .prefix(".hotpatch-")
                .suffix(".gguf.tmp")
                .tempfile_in(dir)
                .map_err(|e| Error::io("create a temporary file in", dir, e))?;
            {
                let mut out = std::io::BufWriter::new(temp.as_file_mut());
                writer.write_to(&mut out)?;
                out.flush()
                    .map_err(|e| Error::io("write", &output.path, e))?;
            }
            temp.as_file()
                .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .map_err(|e| Error::io("set permissions of", &output.path, e))?;
            temp.as_file()
                .sync_all()
                .map_err(|e| Error::io("sync", &output.path, e))?;
            pending.push(temp);
        }
        for (temp, output) in pending.into_iter().zip(&self.files) {
            temp.persist_noclobber(&output.path).map_err(|e| {
                if e.error.kind() == std::io::ErrorKind::AlreadyExists {
                    Error::OutputExists {
                        path: output.path.clone(),
                    }
                } else {
                    Error::io("rename into", &output.path, e.error)
                }
            })?;
        }
        if let Some(first) = self.files.first() {
            sync_dir(parent_dir(&first.path))?;
        }
        Ok(self.files)
    }
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

    #[test]
    fn a_graft_into_a_set_lands_in_the_chosen_shard_and_counts_in_every_shard() {
        let shard = |no: u16, tensors: &[(&str, Vec<u64>)]| {
            let mut w = GgufWriter::new();
            if no == 0 {
                w.set("general.architecture", "toy")
                    .set("toy.block_count", 2u32)
                    .set("toy.embedding_length", 64u32);
            }
            w.set("split.no", Value::U16(no))
                .set("split.count", Value::U16(2))
                .set("split.tensors.count", Value::I32(2));
            for (name, dims) in tensors {
                let n: u64 = dims.iter().product();
                w.add_tensor(TensorSpec::from_bytes(
                    *name,
                    dims.clone(),
                    GgmlType::F32,
                    vec![1u8; 4 * n as usize],
                ));
            }
            let mut out = Vec::new();
            w.write_to(&mut out).unwrap();
            out
        };
        let first = shard(0, &[("blk.0.attn_q.weight", vec![64, 64])]);
        let second = shard(1, &[("blk.1.attn_q.weight", vec![64, 64])]);
        let source = model(64, &[("rope_freqs.weight", vec![32], GgmlType::F32)]);
        let dir = tempfile::tempdir().unwrap();
        let source_path = dir.path().join("source.gguf");
        std::fs::write(&source_path, &source).unwrap();
        let src = Gguf::parse(&source).unwrap();
        let graft_source = GraftSource::new(&src, &source_path, &src);
        let shards = [Gguf::parse(&first).unwrap(), Gguf::parse(&second).unwrap()];
        for target in [0, 1] {
            let mut writers: Vec<_> = shards.iter().map(GgufWriter::from_gguf).collect();
            copy_tensor_into_set(
                &graft_source,
                "rope_freqs.weight",
                &shards,
                &mut writers,
                target,
                None,
            )
            .unwrap();
            for (k, writer) in writers.iter_mut().enumerate() {
                let mut out = Vec::new();
                writer.write_to(&mut out).unwrap();
                let g = Gguf::parse(&out).unwrap();
                let count = g.get(SPLIT_TENSORS_COUNT_KEY).unwrap();
                assert_eq!(count.value_type(), crate::value::ValueType::I32);
                assert_eq!(count.as_u64(), Some(3));
                assert_eq!(g.tensor("rope_freqs.weight").is_some(), k == target);
            }
        }
        let mut writers: Vec<_> = shards.iter().map(GgufWriter::from_gguf).collect();
        // A name held by another shard clashes; a shard past the end is refused.
        let clash = model(64, &[("blk.1.attn_q.weight", vec![64, 64], GgmlType::F32)]);
        std::fs::write(&source_path, &clash).unwrap();
        let clash_gguf = Gguf::parse(&clash).unwrap();
        let clash_source = GraftSource::new(&clash_gguf, &source_path, &clash_gguf);
        assert!(matches!(
            copy_tensor_into_set(
                &clash_source,
                "blk.1.attn_q.weight",
                &shards,
                &mut writers,
                0,
                None
            ),
            Err(Error::TensorExists(_))
        ));
        assert!(matches!(
            copy_tensor_into_set(
                &graft_source,
                "rope_freqs.weight",
                &shards,
                &mut writers,
                2,
                None
            ),
            Err(Error::InvalidEdit(_))
        ));
        assert!(writers.iter().all(|w| w.tensors().len() == 1));
    }
}
