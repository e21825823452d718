//! The GGUF writer: version 3, any metadata, any tensors, a chosen alignment, tensor data
//! streamed from its source, and an atomic replacement of the target file.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{Error, Result};
use crate::gguf::{ALIGNMENT_KEY, DEFAULT_ALIGNMENT, Gguf, MAGIC, MAX_DIMS, align_up};
use crate::types::GgmlType;
use crate::value::{Value, encode_str};

/// The version the writer produces.
pub const WRITE_VERSION: u32 = 3;

/// Size of the chunks in which tensor data is copied from a file.
const COPY_CHUNK: usize = 4 << 20;

/// Where a tensor's data comes from when the file is written.
#[non_exhaustive]
pub enum TensorData<'a> {
    /// Bytes in memory (borrowed from a mapped file, or owned).
    Bytes(Cow<'a, [u8]>),
    /// The mapped bytes of a file at `offset` (as [`GgufWriter::from_gguf`] takes them
    /// from a parse of a [`crate::MappedFile`]). Written into a file, they are copied by
    /// the kernel (`copy_file_range`) where both files allow it, so the data never
    /// passes through this process; anywhere else, from the mapping.
    Mapped {
        /// The mapping's view of the data.
        bytes: &'a [u8],
        /// The file mapped.
        file: &'a File,
        /// Absolute offset of the data in it.
        offset: u64,
    },
    /// A byte range of an open file, read in chunks with positioned reads.
    FileRange {
        /// The file.
        file: &'a File,
        /// Absolute offset of the data in it.
        offset: u64,
    },
    /// Any reader; exactly the tensor's byte count is read from it.
    Reader(Box<dyn Read + 'a>),
}

impl std::fmt::Debug for TensorData<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TensorData::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            TensorData::Mapped { bytes, offset, .. } => {
                write!(f, "Mapped({} bytes at {offset})", bytes.len())
            }
            TensorData::FileRange { offset, .. } => write!(f, "FileRange(at {offset})"),
            TensorData::Reader(_) => f.write_str("Reader"),
        }
    }
}

/// A tensor to write: its description and the source of its data.
#[derive(Debug)]
pub struct TensorSpec<'a> {
    /// The tensor's name.
    pub name: String,
    /// Dimensions, fastest-moving first.
    pub dims: Vec<u64>,
    /// Its ggml type.
    pub ggml_type: GgmlType,
    /// Its data.
    pub data: TensorData<'a>,
}

impl<'a> TensorSpec<'a> {
    /// A tensor whose data is in memory.
    pub fn from_bytes(
        name: impl Into<String>,
        dims: Vec<u64>,
        ggml_type: GgmlType,
        bytes: impl Into<Cow<'a, [u8]>>,
    ) -> TensorSpec<'a> {
        TensorSpec {
            name: name.into(),
            dims,
            ggml_type,
            data: TensorData::Bytes(bytes.into()),
        }
    }

    /// `tensor` of `gguf` as it is: its data borrowed from the mapping, and copied by
    /// the kernel from the mapped file when `gguf` knows it.
    pub fn of(gguf: &Gguf<'a>, tensor: &crate::TensorInfo) -> TensorSpec<'a> {
        TensorSpec {
            name: tensor.name.clone(),
            dims: tensor.dims.clone(),
            ggml_type: tensor.ggml_type,
            data: match gguf.source_file() {
                Some(file) => TensorData::Mapped {
                    bytes: gguf.tensor_data(tensor),
                    file,
                    offset: tensor.data_range().start,
                },
                None => TensorData::Bytes(Cow::Borrowed(gguf.tensor_data(tensor))),
            },
        }
    }

    /// Bytes the tensor takes, checked for a whole number of blocks and overflow.
    pub fn n_bytes(&self) -> Result<u64> {
        let invalid = |why: &str| Error::InvalidWrite(format!("tensor {:?}: {why}", self.name));
        if self.dims.len() > MAX_DIMS as usize {
            return Err(invalid("more than 4 dimensions"));
        }
        if self.dims.first().copied().unwrap_or(1) % self.ggml_type.block_len() != 0 {
            return Err(invalid("first dimension is not a whole number of blocks"));
        }
        let n_elements = self
            .dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| invalid("element count overflows"))?;
        self.ggml_type
            .bytes_for(n_elements)
            .filter(|&n| i64::try_from(n).is_ok())
            .ok_or_else(|| invalid("byte count overflows"))
    }
}

/// Where everything lands in a file the writer would produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The encoded header, metadata and tensor infos (before the padding).
    pub header: Vec<u8>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    /// Each tensor's data offset relative to the data section, in tensor order.
    pub tensor_offsets: Vec<u64>,
    /// Each tensor's byte count, in tensor order.
    pub tensor_bytes: Vec<u64>,
    /// The whole file's length.
    pub file_len: u64,
}

/// Builds a GGUF v3 file: metadata in insertion order, tensors in insertion order, each
/// tensor's data padded to the alignment.
#[derive(Debug, Default)]
pub struct GgufWriter<'a> {
    metadata: Vec<(String, Value)>,
    tensors: Vec<TensorSpec<'a>>,
    /// Set by [`from_gguf`](Self::from_gguf) when the source has a key or tensor name
    /// that is not UTF-8: keys and names are text here, so writing would change it.
    lossy_source: Option<String>,
}

impl<'a> GgufWriter<'a> {
    /// An empty file: no metadata, no tensor.
    pub fn new() -> GgufWriter<'a> {
        GgufWriter::default()
    }

    /// A writer that reproduces `gguf`: the same metadata (owned copies) and the same
    /// tensors, whose data is borrowed from the parsed bytes.
    pub fn from_gguf(gguf: &Gguf<'a>) -> GgufWriter<'a> {
        let metadata = gguf
            .metadata()
            .iter()
            .map(|e| (e.key.to_string(), e.value.to_owned_value()))
            .collect();
        let lossy_source = gguf.first_name_not_utf8().map(str::to_owned);
        let tensors = gguf
            .tensors()
            .iter()
            .map(|t| TensorSpec::of(gguf, t))
            .collect();
        GgufWriter {
            metadata,
            tensors,
            lossy_source,
        }
    }

    /// Sets `key` to `value`: replaced in place when the key exists, appended otherwise.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<Value>) -> &mut Self {
        let key = key.into();
        let value = value.into();
        match self.metadata.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.metadata.push((key, value)),
        }
        self
    }

    /// Removes `key`, returning its value if it was there.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let i = self.metadata.iter().position(|(k, _)| k == key)?;
        Some(self.metadata.remove(i).1)
    }

    /// The metadata, in order.
    pub fn metadata(&self) -> &[(String, Value)] {
        &self.metadata
    }

    /// The metadata, in order, for editing.
    pub fn metadata_mut(&mut self) -> &mut Vec<(String, Value)> {
        &mut self.metadata
    }

    /// Adds a tensor after the others.
    pub fn add_tensor(&mut self, tensor: TensorSpec<'a>) -> &mut Self {
        self.tensors.push(tensor);
        self
    }

    /// The tensors, in order.
    pub fn tensors(&self) -> &[TensorSpec<'a>] {
        &self.tensors
    }

    /// The tensors, in order, for editing.
    pub fn tensors_mut(&mut self) -> &mut Vec<TensorSpec<'a>> {
        &mut self.tensors
    }

    /// Sets the data alignment by writing `general.alignment` (a power of two).
    pub fn set_alignment(&mut self, alignment: u32) -> Result<&mut Self> {
        if !alignment.is_power_of_two() {
            return Err(Error::InvalidWrite(format!(
                "alignment {alignment} is not a power of two"
            )));
        }
        Ok(self.set(ALIGNMENT_KEY, Value::U32(alignment)))
    }

    /// The data alignment the file will have.
    pub fn alignment(&self) -> Result<u64> {
        match self.metadata.iter().find(|(k, _)| k == ALIGNMENT_KEY) {
            None => Ok(DEFAULT_ALIGNMENT),
            Some((_, Value::U32(a))) if a.is_power_of_two() => Ok(u64::from(*a)),
            Some((_, other)) => Err(Error::InvalidWrite(format!(
                "general.alignment must be a power-of-two UINT32, not {other:?}"
            ))),
        }
    }

    /// Checks everything and computes where each part of the file goes.
    pub fn layout(&self) -> Result<Layout> {
        if let Some(what) = &self.lossy_source {
            return Err(Error::NameNotUtf8 { what: what.clone() });
        }
        let alignment = self.alignment()?;
        let mut seen = HashSet::new();
        for (key, _) in &self.metadata {
            if !seen.insert(key.as_str()) {
                return Err(Error::InvalidWrite(format!(
                    "duplicate metadata key {key:?}"
                )));
            }
        }
        let mut header = Vec::with_capacity(4096);
        header.extend_from_slice(&MAGIC);
        header.extend_from_slice(&WRITE_VERSION.to_le_bytes());
        header.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        header.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (key, value) in &self.metadata {
            encode_str(key, &mut header);
            header.extend_from_slice(&value.value_type().id().to_le_bytes());
            value
                .encode(&mut header)
                .map_err(|e| Error::InvalidWrite(format!("metadata {key:?}: {e}")))?;
        }
        let mut names = HashSet::new();
        let mut tensor_offsets = Vec::with_capacity(self.tensors.len());
        let mut tensor_bytes = Vec::with_capacity(self.tensors.len());
        let mut offset = 0u64;
        let overflow = || Error::InvalidWrite("file size overflows".into());
        for t in &self.tensors {
            if !names.insert(t.name.as_str()) {
                return Err(Error::InvalidWrite(format!(
                    "duplicate tensor name {:?}",
                    t.name
                )));
            }
            let n_bytes = t.n_bytes()?;
            encode_str(&t.name, &mut header);
            header.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
            for d in &t.dims {
                header.extend_from_slice(&d.to_le_bytes());
            }
            header.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            header.extend_from_slice(&offset.to_le_bytes());
            tensor_offsets.push(offset);
            tensor_bytes.push(n_bytes);
            offset = offset
                .checked_add(n_bytes)
                .and_then(|end| align_up(end, alignment))
                .ok_or_else(overflow)?;
        }
        let data_offset = align_up(header.len() as u64, alignment).ok_or_else(overflow)?;
        Ok(Layout {
            header,
            data_offset,
            tensor_offsets,
            tensor_bytes,
            file_len: data_offset.checked_add(offset).ok_or_else(overflow)?,
        })
    }

    /// Writes the file to `out`, streaming tensor data from the sources. Returns the
    /// number of bytes written.
    pub fn write_to(&mut self, out: &mut dyn Write) -> Result<u64> {
        self.write_reporting(out, &mut |_, _| {})
    }

    /// Like [`write_to`](Self::write_to), calling `progress(bytes written, total)` after
    /// the header and after each tensor.
    pub fn write_reporting(
        &mut self,
        out: &mut dyn Write,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        self.write_out(&mut AnyOutput(out), progress)
    }

    fn write_out(
        &mut self,
        out: &mut dyn Output,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        let layout = self.layout()?;
        let alignment = self.alignment()?;
        let io_error = |e: io::Error| Error::io("write", "<output>", e);
        out.write_all(&layout.header).map_err(io_error)?;
        write_zeros(out, layout.data_offset - layout.header.len() as u64).map_err(io_error)?;
        let mut written = layout.data_offset;
        progress(written, layout.file_len);
        for (tensor, &n_bytes) in self.tensors.iter_mut().zip(&layout.tensor_bytes) {
            copy_tensor_data(tensor, n_bytes, out)?;
            let padded = align_up(n_bytes, alignment).unwrap_or(n_bytes);
            write_zeros(out, padded - n_bytes).map_err(io_error)?;
            written += padded;
            progress(written, layout.file_len);
        }
        debug_assert_eq!(written, layout.file_len);
        Ok(written)
    }

    /// Writes the file to a temporary file in `path`'s directory, syncs it, renames it
    /// over `path` and syncs the directory: `path` is the old file or the new one, never
    /// a partial one. Returns the number of bytes written.
    pub fn write_to_path(&mut self, path: &Path) -> Result<u64> {
        self.write_to_path_reporting(path, &mut |_, _| {})
    }

    /// Like [`write_to_path`](Self::write_to_path), reporting progress as
    /// [`write_reporting`](Self::write_reporting) does.
    pub fn write_to_path_reporting(
        &mut self,
        path: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<u64> {
        let (temp, written) = self.write_to_temp_beside(path, progress)?;
        temp.persist(path)
            .map_err(|e| Error::io("rename over", path, e.error))?;
        sync_dir(parent_dir(path))?;
        Ok(written)
    }

    /// Writes the file, complete and synced, to a temporary file in `path`'s directory
    /// with the permissions of `path` (rw-r--r-- when it does not exist), and returns it
    /// unrenamed with the number of bytes written: for callers that rename several
    /// files only once all of them are written.
    pub fn write_to_temp_beside(
        &mut self,
        path: &Path,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(tempfile::NamedTempFile, u64)> {
        let dir = parent_dir(path);
        let temp = tempfile::Builder::new()
            .prefix(".hotpatch-")
            .suffix(".gguf.tmp")
            .tempfile_in(dir)
            .map_err(|e| Error::io("create a temporary file in", dir, e))?;
        let written = {
            let mut out = FileOutput::new(temp.as_file());
            let written = self
                .write_out(&mut out, progress)
                .map_err(|e| with_path(e, path))?;
            out.flush().map_err(|e| Error::io("write", path, e))?;
            written
        };
        // The new file keeps the permissions of the one it replaces; a new file gets the
        // usual rw-r--r-- instead of the temporary file's private mode.
        let permissions = std::fs::metadata(path)
            .map(|m| m.permissions())
            .unwrap_or_else(|_| std::os::unix::fs::PermissionsExt::from_mode(0o644));
        temp.as_file()
            .set_permissions(permissions)
            .map_err(|e| Error::io("set permissions of", temp.path(), e))?;
        temp.as_file()
            .sync_all()
            .map_err(|e| Error::io("sync", temp.path(), e))?;
        Ok((temp, written))
    }
}

fn with_path(error: Error, path: &Path) -> Error {
    error.with_path(path)
}

/// The directory that holds `path`: its parent, or `.` for a bare file name (whose
/// parent is the empty path, which no system call accepts) and for `/`.
pub fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Syncs a directory so that a rename in it is durable. The empty path, what
/// [`Path::parent`] gives for a bare file name, is the current directory.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io("sync directory", dir, e))
}

fn write_zeros(out: &mut dyn Write, n: u64) -> io::Result<()> {
    const ZEROS: [u8; 256] = [0; 256];
    let mut left = n;
    while left > 0 {
        let chunk = left.min(ZEROS.len() as u64) as usize;
        out.write_all(&ZEROS[..chunk])?;
        left -= chunk as u64;
    }
    Ok(())
}

/// Where a file is written: any writer, or a file, which can also take tensor data
/// straight from another file.
pub(crate) trait Output: Write {
    /// Appends `len` bytes of `source` at `offset`, copied by the kernel; `Ok(false)`
    /// (nothing copied) when the file systems do not allow it.
    fn copy_range(&mut self, source: &File, offset: u64, len: u64) -> io::Result<bool>;
}

/// Any writer: every byte goes through `write`.
struct AnyOutput<'w>(&'w mut dyn Write);

impl Write for AnyOutput<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.0.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl Output for AnyOutput<'_> {
    fn copy_range(&mut self, _source: &File, _offset: u64, _len: u64) -> io::Result<bool> {
        Ok(false)
    }
}

/// A file written from its start, through a buffer, which tensor data from another file
/// reaches by `copy_file_range` (in-kernel, and shared extents where the file system
/// has them) until the kernel refuses it once.
pub(crate) struct FileOutput<'f> {
    out: BufWriter<&'f File>,
    kernel_copy: bool,
}

impl<'f> FileOutput<'f> {
    /// Writes `file` from its current position through a 1 MiB buffer.
    pub(crate) fn new(file: &'f File) -> FileOutput<'f> {
        FileOutput {
            out: BufWriter::with_capacity(1 << 20, file),
            kernel_copy: true,
        }
    }
}

impl Write for FileOutput<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.out.write(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.out.write_all(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

impl Output for FileOutput<'_> {
    fn copy_range(&mut self, source: &File, offset: u64, len: u64) -> io::Result<bool> {
        if !self.kernel_copy || len == 0 {
            return Ok(false);
        }
        self.out.flush()?;
        let target = *self.out.get_ref();
        let mut from = offset;
        let mut done = 0u64;
        while done < len {
            let chunk = (len - done).min(1 << 30) as usize;
            match rustix::fs::copy_file_range(source, Some(&mut from), target, None, chunk) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n as u64,
                // Across file systems that cannot, or on a kernel without it: nothing
                // was copied, so the caller writes the bytes itself, now and after.
                Err(e)
                    if done == 0
                        && [
                            rustix::io::Errno::XDEV,
                            rustix::io::Errno::INVAL,
                            rustix::io::Errno::NOSYS,
                            rustix::io::Errno::OPNOTSUPP,
                            rustix::io::Errno::BADF,
                        ]
                        .contains(&e) =>
                {
                    self.kernel_copy = false;
                    return Ok(false);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(true)
    }
}

pub(crate) fn copy_tensor_data(
    tensor: &mut TensorSpec<'_>,
    n_bytes: u64,
    out: &mut dyn Output,
) -> Result<()> {
    let name = tensor.name.clone();
    let short = |got: u64| {
        Error::InvalidWrite(format!(
            "tensor {name:?} needs {n_bytes} bytes of data, its source has {got}"
        ))
    };
    let io_error = |e: io::Error| Error::io("write tensor data", "<output>", e);
    match &mut tensor.data {
        TensorData::Bytes(bytes) => {
            if bytes.len() as u64 != n_bytes {
                return Err(short(bytes.len() as u64));
            }
            out.write_all(bytes).map_err(io_error)
        }
        TensorData::Mapped {
            bytes,
            file,
            offset,
        } => {
            if bytes.len() as u64 != n_bytes {
                return Err(short(bytes.len() as u64));
            }
            if out.copy_range(file, *offset, n_bytes).map_err(io_error)? {
                return Ok(());
            }
            out.write_all(bytes).map_err(io_error)
        }
        TensorData::FileRange { file, offset } => {
            let mut buffer = vec![0u8; COPY_CHUNK.min(n_bytes as usize)];
            let mut done = 0u64;
            while done < n_bytes {
                let chunk = (n_bytes - done).min(buffer.len() as u64) as usize;
                file.read_exact_at(&mut buffer[..chunk], *offset + done)
                    .map_err(|e| match e.kind() {
                        io::ErrorKind::UnexpectedEof => short(done),
                        _ => Error::io("read tensor data", "<source>", e),
                    })?;
                out.write_all(&buffer[..chunk]).map_err(io_error)?;
                done += chunk as u64;
            }
            Ok(())
        }
        TensorData::Reader(reader) => {
            let copied = io::copy(&mut reader.take(n_bytes), out)
                .map_err(|e| Error::io("copy tensor data", "<source>", e))?;
            if copied != n_bytes {
                return Err(short(copied));
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests;
