//! Shard sets as llama.cpp's `gguf-split` makes and reads them: naming, resolving a set
//! from any of its shards with every consistency check, splitting a file into a set and
//! merging a set into one file, byte for byte as `llama-gguf-split` writes them.
//!
//! The facts of the format (from gguf-split and ggml's GGUF writer):
//! - shards are named `PREFIX-%05d-of-%05d.gguf`, numbered from 1;
//! - every shard is a complete GGUF v3 file holding `split.no` (u16, 0-based),
//!   `split.count` (u16) and `split.tensors.count` (i32, the total over the set); the
//!   other metadata lives in the first shard only;
//! - the writer keeps keys in the order they were set, and setting a key that exists
//!   removes it and appends it, so the split keys end up last, in the order `split.no`,
//!   `split.tensors.count`, `split.count`; a merge keeps the first shard's keys with
//!   `split.count` set to 0 (so that the result is not taken for a shard), moved last;
//! - tensor records store only the dimensions up to the last one larger than 1 (ggml's
//!   `ggml_n_dims`), and outputs are laid out with ggml's default 32-byte alignment;
//! - one deliberate difference: llama-gguf-split also uses 32 bytes for a file whose
//!   `general.alignment` says otherwise, and so writes a first shard (or merged file)
//!   whose layout contradicts its own alignment key, which readers then misread. Here a
//!   file that holds `general.alignment` (the first shard, a merged file) is laid out
//!   with that alignment; files with the default alignment, which is nearly all, come
//!   out byte-identical to llama-gguf-split's;
//! - a new shard starts every `--split-max-tensors` tensors (128 by default), or, with
//!   `--split-max-size`, when the 32-byte padded tensor sizes would pass the limit; a
//!   shard that would hold no tensor is an error (except a first shard emptied on
//!   purpose with `--no-tensor-first-split`).
//!
//! Outputs are written to temporary files beside them and renamed into place only when
//! every file is complete: an error leaves no partial output.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::file::MappedFile;
use crate::gguf::{Gguf, MAGIC, align_up};
use crate::plan::{FileStamp, Plan};
use crate::writer::{FileOutput, TensorSpec, copy_tensor_data, parent_dir, sync_dir};
use serde::Serialize;

/// The 0-based number of a shard in its set (u16).
pub const SPLIT_NO_KEY: &str = "split.no";
/// The number of shards in the set (u16).
pub const SPLIT_COUNT_KEY: &str = "split.count";
/// The number of tensors in the whole set (i32).
pub const SPLIT_TENSORS_COUNT_KEY: &str = "split.tensors.count";
/// The alignment gguf-split writes with (ggml's `GGUF_DEFAULT_ALIGNMENT`), and that it
/// pads tensor sizes to when it plans a split by size.
pub const SPLIT_ALIGNMENT: u64 = 32;
/// The most shards a set can have (`split.count` is a u16).
pub const MAX_SHARDS: u64 = u16::MAX as u64;

/// The GGUF value type ids the split keys use.
const TYPE_U16: u32 = 2;
const TYPE_I32: u32 = 5;

/// The path of shard `index` (0-based) of a set of `count` shards with this prefix:
/// `PREFIX-00001-of-00003.gguf` for index 0 of 3.
pub fn shard_path(prefix: &Path, index: u32, count: u32) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(format!("-{:05}-of-{:05}.gguf", index + 1, count));
    PathBuf::from(name)
}

/// What a shard's file name says about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardName {
    /// The path without the `-NNNNN-of-NNNNN.gguf` suffix.
    pub prefix: PathBuf,
    /// The 0-based shard number.
    pub index: u32,
    /// Shards in the set.
    pub count: u32,
}

/// Reads a shard's place in its set from its file name, which must be exactly what
/// [`shard_path`] makes (five digits at least, numbered from 1, no more than the count).
pub fn parse_shard_name(path: &Path) -> Option<ShardName> {
    let name = path.file_name()?.to_str()?;
    let stem = name.strip_suffix(".gguf")?;
    let (left, count) = stem.rsplit_once("-of-")?;
    let (prefix, number) = left.rsplit_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(count) || !digits(number) {
        return None;
    }
    let count: u32 = count.parse().ok()?;
    let number: u32 = number.parse().ok()?;
    if number == 0 || number > count || u64::from(count) > MAX_SHARDS {
        return None;
    }
    let prefix = path.with_file_name(prefix);
    let shard = ShardName {
        prefix,
        index: number - 1,
        count,
    };
    // Only the canonical spelling names a shard, as llama.cpp's `llama_split_prefix`
    // requires.
    (shard_path(&shard.prefix, shard.index, shard.count) == path).then_some(shard)
}

/// An integer split key of a parsed shard.
fn split_key(gguf: &Gguf<'_>, path: &Path, key: &'static str) -> Result<u64> {
    gguf.get(key)
        .and_then(|v| v.as_u64())
        .ok_or_else(|| Error::NotAShard {
            path: path.to_owned(),
            key,
        })
}

/// A checked shard set: every shard present, each at its place, agreeing on the count of
/// shards and tensors, and no tensor twice. The files stay mapped read-only.
#[derive(Debug)]
pub struct ShardSet {
    prefix: PathBuf,
    files: Vec<MappedFile>,
    n_tensors: u64,
}

impl ShardSet {
    /// Resolves the set that `any_shard` belongs to and checks it. A missing shard, one
    /// whose `split.no` is not its place, a disagreeing `split.count` or
    /// `split.tensors.count`, a tensor in two shards, or shards that together hold a
    /// different number of tensors are errors that name the file.
    pub fn open(any_shard: &Path) -> Result<ShardSet> {
        let name = parse_shard_name(any_shard).ok_or_else(|| Error::NotAShardName {
            path: any_shard.to_owned(),
        })?;
        let marker = set_rewrite_marker(&name.prefix);
        if marker.exists() {
            return Err(Error::InterruptedSetRewrite { marker });
        }
        let mut files = Vec::with_capacity(name.count as usize);
        let mut seen: HashMap<String, u32> = HashMap::new();
        let mut set_tensors = None;
        let mut held = 0u64;
        for index in 0..name.count {
            let path = shard_path(&name.prefix, index, name.count);
            if !path.exists() {
                return Err(Error::ShardMissing {
                    path,
                    index,
                    count: name.count,
                });
            }
            let file = MappedFile::open(&path)?;
            {
                let gguf = file.parse().map_err(|e| in_file(e, &path))?;
                let no = split_key(&gguf, &path, SPLIT_NO_KEY)?;
                if no != u64::from(index) {
                    return Err(Error::ShardNumberMismatch {
                        path,
                        expected: index,
                        found: no,
                    });
                }
                let count = split_key(&gguf, &path, SPLIT_COUNT_KEY)?;
                if count != u64::from(name.count) {
                    return Err(Error::ShardCountMismatch {
                        path,
                        expected: name.count,
                        found: count,
                    });
                }
                let total = split_key(&gguf, &path, SPLIT_TENSORS_COUNT_KEY)?;
                let expected = *set_tensors.get_or_insert(total);
                if total != expected {
                    return Err(Error::ShardTensorCountMismatch {
                        path,
                        expected,
                        found: total,
                    });
                }
                for tensor in gguf.tensors() {
                    if let Some(&first) = seen.get(&tensor.name) {
                        return Err(Error::DuplicateShardTensor {
                            name: tensor.name.clone(),
                            first: shard_path(&name.prefix, first, name.count),
                            second: path,
                        });
                    }
                    seen.insert(tensor.name.clone(), index);
                }
                held += gguf.tensors().len() as u64;
            }
            files.push(file);
        }
        let expected = set_tensors.unwrap_or(0);
        if held != expected {
            return Err(Error::ShardTensorCountMismatch {
                path: shard_path(&name.prefix, 0, name.count),
                expected,
                found: held,
            });
        }
        Ok(ShardSet {
            prefix: name.prefix,
            files,
            n_tensors: held,
        })
    }

    /// The prefix shared by the shards' names.
    pub fn prefix(&self) -> &Path {
        &self.prefix
    }

    /// The shards, in order, mapped read-only.
    pub fn files(&self) -> &[MappedFile] {
        &self.files
    }

    /// The shards' mappings, in order, giving up the set.
    pub fn into_files(self) -> Vec<MappedFile> {
        self.files
    }

    /// Tensors over the whole set.
    pub fn n_tensors(&self) -> u64 {
        self.n_tensors
    }

    /// Every shard parsed, in order.
    pub fn parse_all(&self) -> Result<Vec<Gguf<'_>>> {
        self.files
            .iter()
            .map(|f| f.parse().map_err(|e| in_file(e, f.path())))
            .collect()
    }
}

/// The shard set `path` belongs to, when its name says it is one shard of several;
/// `None` for any other file (a single file, or a set of one). A set that cannot be
/// resolved is an error.
pub fn open_set_of(path: &Path) -> Result<Option<ShardSet>> {
    match parse_shard_name(path) {
        Some(name) if name.count > 1 => ShardSet::open(path).map(Some),
        _ => Ok(None),
    }
}

/// The file that holds tensor `name`: the shard of `path`'s set that holds it when
/// `path` is one shard of several, otherwise (or when no shard holds it, which the
/// caller reports) `path` itself. Commands that touch one tensor work on that file
/// alone: every shard is a complete GGUF file with its own journal.
pub fn file_holding_tensor(path: &Path, name: &str) -> Result<PathBuf> {
    if let Some(set) = open_set_of(path)? {
        for file in set.files() {
            let gguf = file.parse().map_err(|e| in_file(e, file.path()))?;
            if gguf.tensor(name).is_some() {
                return Ok(file.path().to_owned());
            }
        }
    }
    Ok(path.to_owned())
}

fn in_file(error: Error, path: &Path) -> Error {
    match error {
        Error::Io { .. } => error,
        other => Error::InShard {
            path: path.to_owned(),
            source: Box::new(other),
        },
    }
}

/// When `hotpatch split` starts a new shard.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SplitLimit {
    /// At most this many tensors per shard (`--split-max-tensors`).
    Tensors(u64),
    /// At most this many bytes of padded tensor data per shard (`--split-max-size`).
    Bytes(u64),
}

impl SplitLimit {
    /// Reads a `--split-max-size` value as gguf-split does: a positive whole number
    /// followed by `M` (10^6 bytes) or `G` (10^9 bytes).
    pub fn parse_size(text: &str) -> Result<SplitLimit> {
        let invalid = |reason: &str| Error::InvalidSplit {
            reason: format!("size {text:?}: {reason}"),
        };
        let (number, unit) = match text.as_bytes().last() {
            Some(b'M') => (&text[..text.len() - 1], 1_000_000u64),
            Some(b'G') => (&text[..text.len() - 1], 1_000_000_000u64),
            _ => {
                return Err(invalid(
                    "supported units are M (megabytes) or G (gigabytes)",
                ));
            }
        };
        let n: u64 = number
            .parse()
            .map_err(|_| invalid("not a whole number before the unit"))?;
        if n == 0 {
            return Err(invalid("size must be a positive value"));
        }
        n.checked_mul(unit)
            .map(SplitLimit::Bytes)
            .ok_or_else(|| invalid("too large"))
    }
}

/// How to split a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SplitOptions {
    /// When a new shard starts.
    pub limit: SplitLimit,
    /// Leave the first shard without tensors (metadata only).
    pub no_tensor_first_split: bool,
}

impl Default for SplitOptions {
    /// gguf-split's defaults: 128 tensors per shard, tensors in the first shard.
    fn default() -> SplitOptions {
        SplitOptions {
            limit: SplitLimit::Tensors(128),
            no_tensor_first_split: false,
        }
    }
}

/// One output file of a split or merge.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct OutputFile {
    /// Where it is written.
    pub path: PathBuf,
    /// Tensors it holds.
    pub n_tensors: u64,
    /// Its size in bytes.
    pub n_bytes: u64,
}

/// A split planned from a parsed file: which tensors go to which shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitPlan {
    prefix: PathBuf,
    /// Indices into the input's tensors, per shard.
    shards: Vec<Vec<usize>>,
}

impl SplitPlan {
    /// Plans a split of `gguf` into shards named from `prefix`, as gguf-split does.
    pub fn new(gguf: &Gguf<'_>, prefix: &Path, options: &SplitOptions) -> Result<SplitPlan> {
        if let SplitLimit::Tensors(0) = options.limit {
            return Err(Error::InvalidSplit {
                reason: "the tensor limit must be at least 1".into(),
            });
        }
        let tensors = gguf.tensors();
        let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
        if options.no_tensor_first_split {
            shards.push(Vec::new());
        }
        let mut current = 0u64;
        for (i, tensor) in tensors.iter().enumerate() {
            let padded = align_up(tensor.n_bytes, SPLIT_ALIGNMENT).ok_or(Error::InvalidSplit {
                reason: format!("tensor {:?} is too large", tensor.name),
            })?;
            let next = current.saturating_add(padded);
            let new_shard = match options.limit {
                SplitLimit::Bytes(max) => next > max,
                SplitLimit::Tensors(max) => i > 0 && (i as u64).is_multiple_of(max),
            };
            if new_shard {
                if shards.last().is_some_and(Vec::is_empty) {
                    return Err(Error::InvalidSplit {
                        reason: format!(
                            "shard {} would hold no tensor: the size or tensor limit is too small",
                            shards.len()
                        ),
                    });
                }
                shards.push(Vec::new());
                current = padded;
            } else {
                current = next;
            }
            if let Some(last) = shards.last_mut() {
                last.push(i);
            }
        }
        if shards.len() as u64 > MAX_SHARDS {
            return Err(Error::InvalidSplit {
                reason: format!("{} shards, more than split.count can hold", shards.len()),
            });
        }
        Ok(SplitPlan {
            prefix: prefix.to_owned(),
            shards,
        })
    }

    /// Number of shards.
    pub fn n_shards(&self) -> usize {
        self.shards.len()
    }

    /// The shards' paths and tensor counts, and their sizes once written.
    pub fn outputs(&self, gguf: &Gguf<'_>) -> Result<Vec<OutputFile>> {
        let count = self.shards.len() as u32;
        (0..self.shards.len())
            .map(|index| {
                let meta = self.shard_meta(gguf, index)?;
                let alignment = self.shard_alignment(gguf, index);
                let data: u64 = self.shards[index]
                    .iter()
                    .map(|&t| padded(gguf.tensors()[t].n_bytes, alignment))
                    .sum();
                Ok(OutputFile {
                    path: shard_path(&self.prefix, index as u32, count),
                    n_tensors: self.shards[index].len() as u64,
                    n_bytes: meta.len() as u64 + data,
                })
            })
            .collect()
    }

    /// The alignment shard `index` is laid out with: the input's for the first shard,
    /// which carries its `general.alignment`, the default for the others.
    fn shard_alignment(&self, gguf: &Gguf<'_>, index: usize) -> u64 {
        if index == 0 {
            gguf.alignment()
        } else {
            SPLIT_ALIGNMENT
        }
    }

    /// The metadata and tensor records of shard `index`, padded.
    fn shard_meta(&self, gguf: &Gguf<'_>, index: usize) -> Result<Vec<u8>> {
        let mut keys = KeyList::default();
        if index == 0 {
            keys.copy_all(gguf)?;
        }
        keys.set_u16(SPLIT_NO_KEY, index as u16);
        keys.set_u16(SPLIT_COUNT_KEY, 0);
        keys.set_i32(SPLIT_TENSORS_COUNT_KEY, gguf.tensors().len() as i32);
        keys.set_u16(SPLIT_COUNT_KEY, self.shards.len() as u16);
        let tensors = self.shards[index].iter().map(|&t| &gguf.tensors()[t]);
        Ok(encode_meta(
            &keys,
            tensors,
            self.shard_alignment(gguf, index),
        ))
    }

    /// Writes every shard (temporary files first, renamed into place once all are
    /// complete) and returns what was written. `source` is the file `gguf` was parsed
    /// from, named in errors.
    pub fn write(&self, gguf: &Gguf<'_>, source: &Path) -> Result<Vec<OutputFile>> {
        if gguf.version() < 2 {
            return Err(Error::SplitVersion {
                path: source.to_owned(),
                version: gguf.version(),
            });
        }
        let count = self.shards.len() as u32;
        let mut pending = Vec::with_capacity(self.shards.len());
        for (index, tensors) in self.shards.iter().enumerate() {
            let path = shard_path(&self.prefix, index as u32, count);
            let meta = self.shard_meta(gguf, index)?;
            let runs = tensors
                .iter()
                .map(|&t| TensorSpec::of(gguf, &gguf.tensors()[t]));
            let alignment = self.shard_alignment(gguf, index);
            let (temp, n_bytes) = write_temp(&path, &meta, runs, alignment)?;
            pending.push((temp, path, tensors.len() as u64, n_bytes));
        }
        let mut written = Vec::with_capacity(pending.len());
        for (temp, path, n_tensors, n_bytes) in pending {
            temp.persist(&path)
                .map_err(|e| Error::io("rename over", &path, e.error))?;
            written.push(OutputFile {
                path,
                n_tensors,
                n_bytes,
            });
        }
        if let Some(dir) = written.first().map(|o| parent_dir(&o.path)) {
            sync_dir(dir)?;
        }
        Ok(written)
    }
}

/// The merged file's metadata and tensor records, after checking the shards' versions.
fn merged_meta(set: &ShardSet, parsed: &[Gguf<'_>]) -> Result<Vec<u8>> {
    for (file, gguf) in set.files().iter().zip(parsed) {
        if gguf.version() < 2 {
            return Err(Error::SplitVersion {
                path: file.path().to_owned(),
                version: gguf.version(),
            });
        }
    }
    let mut keys = KeyList::default();
    if let Some(first) = parsed.first() {
        keys.copy_all(first)?;
    }
    keys.set_u16(SPLIT_COUNT_KEY, 0);
    let alignment = merged_alignment(parsed);
    Ok(encode_meta(
        &keys,
        parsed.iter().flat_map(|g| g.tensors()),
        alignment,
    ))
}

/// The merged file keeps the first shard's alignment (its `general.alignment`).
fn merged_alignment(parsed: &[Gguf<'_>]) -> u64 {
    parsed.first().map_or(SPLIT_ALIGNMENT, Gguf::alignment)
}

fn parse_all(set: &ShardSet) -> Result<Vec<Gguf<'_>>> {
    set.parse_all()
}

/// What [`merge`] would write, without writing it.
pub fn plan_merge(set: &ShardSet, out: &Path) -> Result<OutputFile> {
    let parsed = parse_all(set)?;
    let meta = merged_meta(set, &parsed)?;
    let alignment = merged_alignment(&parsed);
    let data: u64 = parsed
        .iter()
        .flat_map(|g| g.tensors())
        .map(|t| padded(t.n_bytes, alignment))
        .sum();
    Ok(OutputFile {
        path: out.to_owned(),
        n_tensors: set.n_tensors(),
        n_bytes: meta.len() as u64 + data,
    })
}

/// Merges a checked shard set into one file at `out`, as `llama-gguf-split --merge`
/// does; `out` must not exist.
pub fn merge(set: &ShardSet, out: &Path) -> Result<OutputFile> {
    if out.exists() {
        return Err(Error::OutputExists {
            path: out.to_owned(),
        });
    }
    let parsed = parse_all(set)?;
    let meta = merged_meta(set, &parsed)?;
    let runs = parsed.iter().flat_map(|gguf| {
        gguf.tensors()
            .iter()
            .map(move |tensor| TensorSpec::of(gguf, tensor))
    });
    let (temp, n_bytes) = write_temp(out, &meta, runs, merged_alignment(&parsed))?;
    // A file that appeared at `out` meanwhile is not replaced.
    temp.persist_noclobber(out)
        .map_err(|e| Error::io("create", out, e.error))?;
    sync_dir(parent_dir(out))?;
    Ok(OutputFile {
        path: out.to_owned(),
        n_tensors: set.n_tensors(),
        n_bytes,
    })
}

/// `n_bytes` rounded up to a multiple of `alignment` (a power of two that the reader
/// checked, or the default); sizes come from parsed files, far from overflowing.
fn padded(n_bytes: u64, alignment: u64) -> u64 {
    n_bytes.div_ceil(alignment) * alignment
}

/// Metadata entries in writing order, each as its encoded bytes, with the writer's
/// rule that setting a key removes any entry of that key and appends the new one.
#[derive(Default)]
struct KeyList {
    entries: Vec<(String, Vec<u8>)>,
}

impl KeyList {
    /// Appends every entry of `gguf` as it is encoded in the file (v2 and v3 encode
    /// entries as the writer does).
    fn copy_all(&mut self, gguf: &Gguf<'_>) -> Result<()> {
        for entry in gguf.metadata() {
            let bytes =
                &gguf.bytes()[entry.entry_offset as usize..entry.value_range().end as usize];
            self.set_raw(&entry.key.to_string_lossy(), bytes.to_vec());
        }
        Ok(())
    }

    fn set_raw(&mut self, key: &str, bytes: Vec<u8>) {
        self.entries.retain(|(k, _)| k != key);
        self.entries.push((key.to_owned(), bytes));
    }

    fn set_scalar(&mut self, key: &str, type_id: u32, value: &[u8]) {
        let mut bytes = Vec::with_capacity(8 + key.len() + 4 + value.len());
        bytes.extend_from_slice(&(key.len() as u64).to_le_bytes());
        bytes.extend_from_slice(key.as_bytes());
        bytes.extend_from_slice(&type_id.to_le_bytes());
        bytes.extend_from_slice(value);
        self.set_raw(key, bytes);
    }

    fn set_u16(&mut self, key: &str, value: u16) {
        self.set_scalar(key, TYPE_U16, &value.to_le_bytes());
    }

    fn set_i32(&mut self, key: &str, value: i32) {
        self.set_scalar(key, TYPE_I32, &value.to_le_bytes());
    }
}

/// The dimensions ggml writes for a tensor: up to the last one larger than 1, at least
/// one (a tensor without dimensions is written as one element of one dimension).
fn written_dims(dims: &[u64]) -> Vec<u64> {
    match dims.iter().rposition(|&d| d > 1) {
        Some(last) => dims[..=last].to_vec(),
        None => vec![1],
    }
}

/// Header, metadata and tensor records of a v3 file holding `tensors` in order, laid out
/// with `alignment`, padded to the start of the data section.
fn encode_meta<'t>(
    keys: &KeyList,
    tensors: impl Iterator<Item = &'t crate::TensorInfo> + Clone,
    alignment: u64,
) -> Vec<u8> {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.clone().count() as u64).to_le_bytes());
    out.extend_from_slice(&(keys.entries.len() as u64).to_le_bytes());
    for (_, bytes) in &keys.entries {
        out.extend_from_slice(bytes);
    }
    let mut offset = 0u64;
    for tensor in tensors {
        out.extend_from_slice(&(tensor.name.len() as u64).to_le_bytes());
        out.extend_from_slice(tensor.name.as_bytes());
        let dims = written_dims(&tensor.dims);
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in &dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&tensor.ggml_type.id().to_le_bytes());
        out.extend_from_slice(&offset.to_le_bytes());
        offset += padded(tensor.n_bytes, alignment);
    }
    out.resize(padded(out.len() as u64, alignment) as usize, 0);
    out
}

/// Writes `meta` and then each run padded to `alignment` to a synced temporary file
/// beside `path`. Data from a mapped file is copied by the kernel where the file
/// systems allow it, as a rewrite copies it.
fn write_temp<'r>(
    path: &Path,
    meta: &[u8],
    runs: impl Iterator<Item = TensorSpec<'r>>,
    alignment: u64,
) -> Result<(tempfile::NamedTempFile, u64)> {
    let dir = parent_dir(path);
    let temp = tempfile::Builder::new()
        .prefix(".hotpatch-")
        .suffix(".gguf.tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io("create a temporary file in", dir, e))?;
    let zeros = vec![0u8; alignment as usize];
    let write_error = |e| Error::io("write", path, e);
    let mut out = FileOutput::new(temp.as_file());
    out.write_all(meta).map_err(write_error)?;
    let mut written = meta.len() as u64;
    for mut run in runs {
        let len = run.n_bytes()?;
        copy_tensor_data(&mut run, len, &mut out).map_err(|e| e.with_path(path))?;
        let pad = padded(len, alignment) - len;
        out.write_all(&zeros[..pad as usize]).map_err(write_error)?;
        written += len + pad;
    }
    out.flush().map_err(write_error)?;
    drop(out);
    temp.as_file()
        .set_permissions(std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(|e| Error::io("set permissions of", temp.path(), e))?;
    temp.as_file()
        .sync_all()
        .map_err(|e| Error::io("sync", temp.path(), e))?;
    Ok((temp, written))
}

/// A split as a [`Plan`]: the shards it would write, reported before anything is
/// written, and written by `apply` from the same parse (refused with
/// [`Error::StalePlan`] when the input changed since).
#[derive(Debug, Serialize)]
pub struct SplitFiles<'a> {
    kind: &'static str,
    file: PathBuf,
    files: Vec<OutputFile>,
    stamp: FileStamp,
    #[serde(skip)]
    gguf: &'a Gguf<'a>,
    #[serde(skip)]
    split: SplitPlan,
}

impl<'a> SplitFiles<'a> {
    /// Plans the split of `source`, parsed as `gguf`, by `split`.
    pub fn new(source: &Path, gguf: &'a Gguf<'a>, split: SplitPlan) -> Result<SplitFiles<'a>> {
        Ok(SplitFiles {
            kind: "new_files",
            file: source.to_owned(),
            files: split.outputs(gguf)?,
            stamp: FileStamp::take(source, gguf.bytes(), std::iter::once(0..gguf.data_offset()))?,
            gguf,
            split,
        })
    }
}

impl Plan for SplitFiles<'_> {
    type Applied = Vec<OutputFile>;
    type Error = Error;

    fn is_noop(&self) -> bool {
        false
    }

    fn apply(self) -> Result<Vec<OutputFile>> {
        self.stamp.check(self.gguf.bytes())?;
        self.split.write(self.gguf, &self.file)
    }
}

/// A merge as a [`Plan`]: the file it would write, reported before anything is written,
/// and written by `apply` (refused with [`Error::StalePlan`] when a shard changed since).
#[derive(Debug, Serialize)]
pub struct MergeFiles<'a> {
    kind: &'static str,
    file: PathBuf,
    files: Vec<OutputFile>,
    stamps: Vec<FileStamp>,
    #[serde(skip)]
    set: &'a ShardSet,
}

impl<'a> MergeFiles<'a> {
    /// Plans the merge of `set` into `out`, which must not exist.
    pub fn new(set: &'a ShardSet, out: &Path) -> Result<MergeFiles<'a>> {
        if out.exists() {
            return Err(Error::OutputExists {
                path: out.to_owned(),
            });
        }
        let output = plan_merge(set, out)?;
        let stamps = set
            .files()
            .iter()
            .map(|f| {
                let header = f.parse()?.data_offset();
                FileStamp::take(f.path(), f.bytes(), std::iter::once(0..header))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(MergeFiles {
            kind: "new_files",
            file: set.files()[0].path().to_owned(),
            files: vec![output],
            stamps,
            set,
        })
    }
}

impl Plan for MergeFiles<'_> {
    type Applied = OutputFile;
    type Error = Error;

    fn is_noop(&self) -> bool {
        false
    }

    fn apply(self) -> Result<OutputFile> {
        for (stamp, file) in self.stamps.iter().zip(self.set.files()) {
            stamp.check(file.bytes())?;
        }
        merge(self.set, &self.files[0].path)
    }
}

mod rewrite;
pub mod transaction;
pub use rewrite::{
    SetRewriteOutcome, SetRewritePlan, SetRewriteRecovery, ShardWritten, finish_set_rewrite,
    interrupted_set_rewrite, output_prefix, set_rewrite_marker,
};

#[cfg(test)]
mod tests;
