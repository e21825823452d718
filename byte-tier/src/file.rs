//! Opening a GGUF file for reading: a read-only memory map, so that parsing touches only
//! the header pages and tensor data is never copied.

#![allow(unsafe_code)]

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;

use crate::error::{Error, Result};
use crate::gguf::Gguf;

/// A GGUF file mapped read-only.
#[derive(Debug)]
pub struct MappedFile {
    path: PathBuf,
    bytes: Bytes,
}

#[derive(Debug)]
enum Bytes {
    Mapped(Mmap),
    /// An empty file cannot be mapped; it is held as an empty buffer.
    Empty,
}

impl MappedFile {
    /// Maps `path` read-only.
    pub fn open(path: impl AsRef<Path>) -> Result<MappedFile> {
        let path = path.as_ref();
        let file = File::open(path).map_err(|e| Error::io("open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io("stat", path, e))?
            .len();
        let bytes = if len == 0 {
            Bytes::Empty
        } else {
            // SAFETY: the mapping is read-only and private to this value. Another process
            // may still write to or truncate the file while it is mapped; writes show
            // through (which live patching relies on) and truncation would fault on
            // access, the documented hazard of every mapped reader, llama.cpp's included.
            let map = unsafe { Mmap::map(&file) }.map_err(|e| Error::io("map", path, e))?;
            Bytes::Mapped(map)
        };
        Ok(MappedFile {
            path: path.to_owned(),
            bytes,
        })
    }

    /// The path the file was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        match &self.bytes {
            Bytes::Mapped(map) => map,
            Bytes::Empty => &[],
        }
    }

    /// Parses and checks the file.
    pub fn parse(&self) -> Result<Gguf<'_>> {
        Gguf::parse(self.bytes())
    }
}
