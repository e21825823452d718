//! Rewrites of a whole shard set: prune, requantize, rename or remove tensors over every
//! shard at once, keeping llama.cpp's rules for sets.
//!
//! - the edit sees every shard's parse and a writer for each; the first shard holds the
//!   general metadata, the others only their split keys;
//! - afterwards `split.tensors.count` is set to the new total in every shard, in place in
//!   each key list (so the keys keep gguf-split's order), and `split.no`/`split.count` are
//!   kept: the set keeps its shape, and a shard may end up with no tensor;
//! - a shard whose rewrite changes nothing is not written again (unless the set goes to
//!   a new prefix);
//! - applying is all or none across the files: every new shard is written, complete and
//!   synced, to a temporary file beside its target; then a marker file listing the
//!   renames is written and synced; then the renames are done and the marker removed. A
//!   crash before the marker leaves the old set (and stray temporary files); a crash
//!   after it leaves a marker that [`ShardSet::open`](super::ShardSet::open) refuses with
//!   [`Error::InterruptedSetRewrite`] and that [`finish_set_rewrite`] completes, since
//!   every file it names is already durable.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{SPLIT_TENSORS_COUNT_KEY, ShardSet, parse_shard_name, shard_path};
use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::journal::Journal;
use crate::plan::{FileStamp, Plan, RewriteChanges, hold_journal, retire_journal};
use crate::value::Value;
use crate::writer::{GgufWriter, parent_dir, sync_dir};

/// The marker of an unfinished set rewrite whose shards have this prefix.
pub fn set_rewrite_marker(prefix: &Path) -> PathBuf {
    let mut name = prefix.as_os_str().to_owned();
    name.push(".hotpatch-set-rewrite");
    PathBuf::from(name)
}

/// What the marker records: each temporary file (a file name in the marker's directory)
/// and the shard it becomes.
#[derive(Debug, Serialize, Deserialize)]
struct Marker {
    renames: Vec<(String, String)>,
}

/// The prefix a set rewrite writes to for `-o OUT`: OUT's own prefix when it names a
/// shard of a set of `count` (`new-00001-of-00003.gguf`), else OUT without a final
/// `.gguf` (`new.gguf` and `new` both give `new-0000K-of-0000N.gguf`).
pub fn output_prefix(out: &Path, count: u32) -> PathBuf {
    match parse_shard_name(out) {
        Some(name) if name.count == count => name.prefix,
        _ => match out.to_str().and_then(|s| s.strip_suffix(".gguf")) {
            Some(stem) if !stem.is_empty() => PathBuf::from(stem),
            _ => out.to_owned(),
        },
    }
}

/// One shard of a [`SetRewritePlan`].
struct Shard<'a> {
    input: PathBuf,
    output: PathBuf,
    source: &'a [u8],
    stamp: FileStamp,
    writer: GgufWriter<'a>,
    size_after: u64,
    changes: RewriteChanges,
    rewritten: bool,
}

/// What a set rewrite reports for one shard.
#[derive(Serialize)]
struct ShardReport<'p> {
    file: &'p Path,
    output: &'p Path,
    size_before: u64,
    size_after: u64,
    rewritten: bool,
    #[serde(flatten)]
    changes: &'p RewriteChanges,
    stamp: &'p FileStamp,
}

/// A rewrite of every shard of a set through one edit, planned (the edit runs, nothing
/// is written) when it is made and written, all or none, when it is applied.
pub struct SetRewritePlan<'a, R> {
    first: PathBuf,
    output_prefix: Option<PathBuf>,
    shards: Vec<Shard<'a>>,
    details: R,
    progress: Option<Box<dyn FnMut(u64, u64) + 'a>>,
}

impl<R: std::fmt::Debug> std::fmt::Debug for SetRewritePlan<'_, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetRewritePlan")
            .field("first", &self.first)
            .field("output_prefix", &self.output_prefix)
            .field(
                "shards",
                &self
                    .shards
                    .iter()
                    .map(|s| (&s.output, s.rewritten))
                    .collect::<Vec<_>>(),
            )
            .field("details", &self.details)
            .finish_non_exhaustive()
    }
}

impl<R: Serialize> Serialize for SetRewritePlan<'_, R> {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Report<'p, R> {
            kind: &'static str,
            file: &'p Path,
            output: Option<&'p Path>,
            size_before: u64,
            size_after: u64,
            files: Vec<ShardReport<'p>>,
            report: &'p R,
        }
        Report {
            kind: "set_rewrite",
            file: &self.first,
            output: self.output_prefix.as_deref(),
            size_before: self.shards.iter().map(|s| s.stamp.len).sum(),
            size_after: self.shards.iter().map(|s| s.size_after).sum(),
            files: self
                .shards
                .iter()
                .map(|s| ShardReport {
                    file: &s.input,
                    output: &s.output,
                    size_before: s.stamp.len,
                    size_after: s.size_after,
                    rewritten: s.rewritten,
                    changes: &s.changes,
                    stamp: &s.stamp,
                })
                .collect(),
            report: &self.details,
        }
        .serialize(serializer)
    }
}

/// One shard a set rewrite wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ShardWritten {
    /// The shard it was made from.
    pub input: PathBuf,
    /// The file written (the input itself for a rewrite in place).
    pub output: PathBuf,
    /// The input's length.
    pub bytes_before: u64,
    /// The output's length.
    pub bytes_after: u64,
    /// Whether the file was written (a shard the edit did not change is left as it is).
    pub rewritten: bool,
}

/// What applying a [`SetRewritePlan`] did.
#[derive(Debug)]
pub struct SetRewriteOutcome<R> {
    /// What the edit returned.
    pub result: R,
    /// Every shard, in order.
    pub shards: Vec<ShardWritten>,
    /// Where shard journals were moved: their offsets describe the old layouts.
    pub archived_journals: Vec<PathBuf>,
}

impl<'a, R> SetRewritePlan<'a, R> {
    /// Plans the rewrite of `set` (each shard parsed in `parsed`, in order) through
    /// `edit`, over the set itself when `output` is `None`, else into a new set named by
    /// [`output_prefix`]. The edit runs now, once, on a writer per shard.
    pub fn new(
        set: &ShardSet,
        parsed: &[Gguf<'a>],
        output: Option<&Path>,
        edit: impl FnOnce(&[Gguf<'a>], &mut [GgufWriter<'a>]) -> Result<R>,
    ) -> Result<SetRewritePlan<'a, R>> {
        let count = u32::try_from(parsed.len()).map_err(|_| {
            Error::InvalidEdit(format!("{} shards are more than a set holds", parsed.len()))
        })?;
        let mut writers: Vec<GgufWriter<'a>> = parsed.iter().map(GgufWriter::from_gguf).collect();
        let details = edit(parsed, &mut writers)?;
        let total: usize = writers.iter().map(|w| w.tensors().len()).sum();
        let total = i32::try_from(total).map_err(|_| {
            Error::InvalidEdit(format!("{total} tensors do not fit split.tensors.count"))
        })?;
        let prefix = output.map(|out| output_prefix(out, count));
        let mut shards = Vec::with_capacity(parsed.len());
        for (index, ((file, gguf), mut writer)) in
            set.files().iter().zip(parsed).zip(writers).enumerate()
        {
            set_split_tensor_count(&mut writer, total);
            let input = file.path().to_owned();
            let stamp =
                FileStamp::take(&input, gguf.bytes(), std::iter::once(0..gguf.data_offset()))?;
            let size_after = writer.layout()?.file_len;
            let changes = RewriteChanges::between(gguf, &writer);
            let output = match &prefix {
                Some(prefix) => shard_path(prefix, index as u32, count),
                None => input.clone(),
            };
            let rewritten = prefix.is_some() || !changes.is_empty() || size_after != stamp.len;
            shards.push(Shard {
                input,
                output,
                source: gguf.bytes(),
                stamp,
                writer,
                size_after,
                changes,
                rewritten,
            });
        }
        Ok(SetRewritePlan {
            first: set
                .files()
                .first()
                .map(|f| f.path().to_owned())
                .unwrap_or_default(),
            output_prefix: prefix,
            shards,
            details,
            progress: None,
        })
    }

    /// Reports progress (bytes written, total) while the plan is applied.
    pub fn with_progress(mut self, progress: impl FnMut(u64, u64) + 'a) -> Self {
        self.progress = Some(Box::new(progress));
        self
    }

    /// The first shard of the set the plan was made from.
    pub fn first_shard(&self) -> &Path {
        &self.first
    }

    /// What the edit returned.
    pub fn details(&self) -> &R {
        &self.details
    }

    /// The bytes the rewrite writes.
    pub fn bytes_to_write(&self) -> u64 {
        self.shards
            .iter()
            .filter(|s| s.rewritten)
            .map(|s| s.size_after)
            .sum()
    }

    /// Writes the new shards, all or none (see the module's comment).
    pub fn write(mut self) -> Result<SetRewriteOutcome<R>> {
        let mut progress = self.progress.take();
        let mut progress = |done: u64, total: u64| {
            if let Some(p) = progress.as_mut() {
                p(done, total);
            }
        };
        let in_place = self.output_prefix.is_none();
        // Hold the journal of every shard that is replaced: no other writer works on the
        // old set meanwhile.
        let mut held: Vec<(Journal, PathBuf)> = Vec::new();
        for shard in self.shards.iter().filter(|s| s.rewritten && in_place) {
            if let Some(journal) = hold_journal(&shard.input)? {
                held.push((journal, shard.input.clone()));
            }
        }
        for shard in &self.shards {
            shard.stamp.check(shard.source)?;
        }
        let total = self.bytes_to_write();
        let mut done = 0u64;
        let mut pending = Vec::new();
        let mut written = Vec::with_capacity(self.shards.len());
        for mut shard in self.shards {
            let mut bytes_after = shard.stamp.len;
            if shard.rewritten {
                let base = done;
                let (temp, n) = shard
                    .writer
                    .write_to_temp_beside(&shard.output, &mut |d, _| progress(base + d, total))?;
                done += n;
                bytes_after = n;
                pending.push((temp, shard.output.clone()));
            }
            written.push(ShardWritten {
                input: shard.input,
                output: shard.output,
                bytes_before: shard.stamp.len,
                bytes_after,
                rewritten: shard.rewritten,
            });
        }
        if !pending.is_empty() {
            rename_all(&set_rewrite_marker_for(&written), pending)?;
        }
        let mut archived_journals = Vec::new();
        for (journal, input) in held {
            archived_journals.extend(retire_journal(journal, &input)?);
        }
        Ok(SetRewriteOutcome {
            result: self.details,
            shards: written,
            archived_journals,
        })
    }
}

impl<R: Serialize> Plan for SetRewritePlan<'_, R> {
    type Applied = SetRewriteOutcome<R>;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.shards.iter().all(|s| !s.rewritten)
    }

    fn apply(self) -> Result<SetRewriteOutcome<R>> {
        self.write()
    }
}

/// Sets `split.tensors.count` where the key stands (keeping the key order), as the i32
/// gguf-split writes; a writer without the key gets it appended.
fn set_split_tensor_count(writer: &mut GgufWriter<'_>, total: i32) {
    match writer
        .metadata_mut()
        .iter_mut()
        .find(|(key, _)| key == SPLIT_TENSORS_COUNT_KEY)
    {
        Some((_, value)) => *value = Value::I32(total),
        None => {
            writer.set(SPLIT_TENSORS_COUNT_KEY, Value::I32(total));
        }
    }
}

/// The marker for the set the written shards belong to.
fn set_rewrite_marker_for(written: &[ShardWritten]) -> PathBuf {
    let first = written
        .first()
        .map(|w| w.output.as_path())
        .unwrap_or(Path::new(""));
    match parse_shard_name(first) {
        Some(name) => set_rewrite_marker(&name.prefix),
        None => set_rewrite_marker(first),
    }
}

/// Renames every complete temporary file over its target, under a marker that makes the
/// renames finishable after a crash.
fn rename_all(marker: &Path, pending: Vec<(tempfile::NamedTempFile, PathBuf)>) -> Result<()> {
    let dir = parent_dir(marker).to_owned();
    let name = |p: &Path| -> Result<String> {
        p.file_name()
            .and_then(|n| n.to_str())
            .map(str::to_owned)
            .ok_or_else(|| Error::InvalidEdit(format!("{} has no UTF-8 file name", p.display())))
    };
    // Every target is a shard of the marker's prefix, and each temporary file was made
    // beside its target, so the marker names both by file name alone.
    if let Some((_, target)) = pending.iter().find(|(_, t)| parent_dir(t) != dir) {
        return Err(Error::InvalidEdit(format!(
            "{} is not in the set's directory {}",
            target.display(),
            dir.display()
        )));
    }
    let mut kept = Vec::with_capacity(pending.len());
    let mut renames = Vec::with_capacity(pending.len());
    for (temp, target) in pending {
        let (_, path) = temp
            .keep()
            .map_err(|e| Error::io("keep", &target, e.error))?;
        renames.push((name(&path)?, name(&target)?));
        kept.push((path, target));
    }
    let body = serde_json::to_vec_pretty(&Marker { renames })
        .map_err(|e| Error::InvalidEdit(format!("encode the set rewrite marker: {e}")))?;
    write_synced(marker, &body)?;
    sync_dir(&dir)?;
    for (index, (path, target)) in kept.iter().enumerate() {
        std::fs::rename(path, target).map_err(|e| Error::io("rename over", target, e))?;
        if index == 0 {
            crate::journal::failpoint("set-rewrite-renamed-first");
        }
    }
    sync_dir(&dir)?;
    std::fs::remove_file(marker).map_err(|e| Error::io("remove", marker, e))?;
    sync_dir(&dir)
}

fn write_synced(path: &Path, body: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = parent_dir(path);
    let mut temp = tempfile::Builder::new()
        .prefix(".hotpatch-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(|e| Error::io("create a temporary file in", dir, e))?;
    temp.write_all(body)
        .and_then(|()| temp.as_file().sync_all())
        .map_err(|e| Error::io("write", path, e))?;
    temp.persist(path)
        .map_err(|e| Error::io("rename over", path, e.error))?;
    Ok(())
}

/// The shards a crash left unrenamed, and whether the marker is there at all.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename = "set_recovery")]
pub struct SetRewriteRecovery {
    /// The marker.
    pub marker: PathBuf,
    /// Temporary file and the shard it becomes, for each rename still to do.
    pub renames: Vec<(PathBuf, PathBuf)>,
}

/// What [`finish_set_rewrite`] would do for the set that `any_shard` names: `None` when
/// no set rewrite was interrupted there.
pub fn interrupted_set_rewrite(any_shard: &Path) -> Result<Option<SetRewriteRecovery>> {
    let Some(name) = parse_shard_name(any_shard) else {
        return Ok(None);
    };
    let marker = set_rewrite_marker(&name.prefix);
    let body = match std::fs::read(&marker) {
        Ok(body) => body,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read", &marker, e)),
    };
    let parsed: Marker =
        serde_json::from_slice(&body).map_err(|e| Error::CorruptSetRewriteMarker {
            path: marker.clone(),
            reason: e.to_string(),
        })?;
    let dir = parent_dir(&marker).to_owned();
    let mut renames = Vec::new();
    for (temp, target) in parsed.renames {
        let plain = |n: &str| !n.is_empty() && !n.contains('/') && n != "." && n != "..";
        if !plain(&temp) || !plain(&target) {
            return Err(Error::CorruptSetRewriteMarker {
                path: marker.clone(),
                reason: format!("{temp:?} or {target:?} is not a file name"),
            });
        }
        let (temp, target) = (dir.join(temp), dir.join(target));
        // A rename already done leaves no temporary file and a complete target.
        if temp.exists() {
            renames.push((temp, target));
        } else if !target.exists() {
            return Err(Error::CorruptSetRewriteMarker {
                path: marker.clone(),
                reason: format!("neither {} nor {} exists", temp.display(), target.display()),
            });
        }
    }
    Ok(Some(SetRewriteRecovery { marker, renames }))
}

/// Completes an interrupted set rewrite: does the renames its marker lists that a crash
/// left undone (each temporary file is complete and synced before the marker is
/// written), then removes the marker.
pub fn finish_set_rewrite(recovery: &SetRewriteRecovery) -> Result<()> {
    let dir = parent_dir(&recovery.marker).to_owned();
    for (temp, target) in &recovery.renames {
        std::fs::rename(temp, target).map_err(|e| Error::io("rename over", target, e))?;
    }
    sync_dir(&dir)?;
    std::fs::remove_file(&recovery.marker).map_err(|e| Error::io("remove", &recovery.marker, e))?;
    sync_dir(&dir)
}

impl Plan for SetRewriteRecovery {
    type Applied = usize;
    type Error = Error;

    fn is_noop(&self) -> bool {
        false
    }

    fn apply(self) -> Result<usize> {
        finish_set_rewrite(&self)?;
        Ok(self.renames.len())
    }
}
