//! The agent's control protocol: length-prefixed, bounded frames over a Unix socket.
//!
//! A frame is a 12-byte prefix (`u32` header length, `u64` data length, little-endian),
//! a JSON header of at most [`MAX_HEADER`] bytes, then the data bytes (a write's bytes or a
//! read's answer). A reader checks both lengths before it allocates anything: the header
//! against [`MAX_HEADER`], the data against what the header says it carries.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// The protocol version both sides speak.
pub const PROTOCOL: u32 = 1;

/// The largest JSON header accepted, in bytes.
pub const MAX_HEADER: u32 = 64 << 20;

/// The environment variable naming the agent's socket.
pub const SOCKET_ENV: &str = "HOTPATCH_AGENT_SOCKET";

/// A request to the agent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Versions and state.
    Hello {
        /// The client's protocol version.
        protocol: u32,
    },
    /// Every weight tensor the agent has seen placed, and how each can be written.
    Tensors,
    /// Writes bytes into tensors, all between the same two forward passes. The frame's
    /// data is the writes' bytes, one after the other.
    Write {
        /// The writes, in order.
        writes: Vec<WriteSpec>,
    },
    /// Reads bytes of a tensor, where its buffer allows.
    Read {
        /// The tensor.
        tensor: String,
        /// Byte offset in the tensor.
        offset: u64,
        /// Bytes to read.
        len: u64,
    },
    /// Waits for a pass boundary and answers the pass counters.
    Barrier,
    /// Keeps a record (of a memory-only patch) under a key, for later clients.
    PutRecord {
        /// The key.
        key: String,
        /// The record.
        record: serde_json::Value,
    },
    /// Drops a record.
    DropRecord {
        /// The key.
        key: String,
    },
    /// Every record kept, in the order they were put.
    Records,
}

/// One write of a [`Request::Write`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriteSpec {
    /// The tensor.
    pub tensor: String,
    /// Byte offset in the tensor.
    pub offset: u64,
    /// Bytes written.
    pub len: u64,
}

/// The agent's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case", deny_unknown_fields)]
pub enum Reply {
    /// Answer to [`Request::Hello`].
    Hello(Hello),
    /// Answer to [`Request::Tensors`].
    Tensors {
        /// The tensors, in the order they were placed.
        tensors: Vec<TensorEntry>,
    },
    /// Answer to [`Request::Write`].
    Written(WriteReport),
    /// Answer to [`Request::Read`]; the frame's data holds the bytes.
    Data {
        /// Bytes read.
        len: u64,
    },
    /// Answer to [`Request::Barrier`].
    Passes(PassCounters),
    /// Answer to [`Request::Records`].
    Records {
        /// `(key, record)` pairs.
        records: Vec<(String, serde_json::Value)>,
    },
    /// A request that needed no other answer was carried out.
    Done,
    /// The request was refused; nothing was written.
    Error(AgentError),
}

/// Versions and state, from [`Request::Hello`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    /// The agent's version.
    pub agent: String,
    /// The protocol it speaks.
    pub protocol: u32,
    /// ggml's version (`ggml_version()`).
    pub ggml: Option<String>,
    /// ggml's commit (`ggml_commit()`).
    pub ggml_commit: Option<String>,
    /// llama.cpp's build number, when its common library says.
    pub llama_build: Option<i64>,
    /// llama.cpp's commit, when its common library says.
    pub llama_commit: Option<String>,
    /// The server's process id.
    pub pid: u32,
    /// Why the agent is inert (it forwards every call and patches nothing), if it is.
    pub inert: Option<String>,
    /// The forward-pass entry points seen so far.
    pub entry_points: Vec<String>,
    /// Weight tensors seen placed.
    pub tensors: usize,
    /// The pass counters.
    pub passes: PassCounters,
}

/// How a forward pass and the agent's writes have met.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PassCounters {
    /// Forward passes started.
    pub passes: u64,
    /// Writes carried out.
    pub writes: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Writes carried out while a pass ran: 0, or the agent is broken.
    pub writes_during_pass: u64,
    /// Microseconds the last write batch waited for a pass boundary.
    pub last_wait_us: u64,
}

/// What a write batch did.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriteReport {
    /// Writes carried out.
    pub writes: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Microseconds spent waiting for a pass boundary.
    pub waited_us: u64,
    /// The pass counters after the batch.
    pub passes: PassCounters,
}

/// A weight tensor as the agent saw it placed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TensorEntry {
    /// Its name.
    pub name: String,
    /// Its ggml type id.
    pub ggml_type: u32,
    /// Its ggml type's name.
    pub type_name: String,
    /// Its shape, `ne[0..4]`.
    pub ne: [i64; 4],
    /// Its size in bytes (`ggml_nbytes`).
    pub nbytes: u64,
    /// The name of the buffer holding it (`CPU_Mapped`, `CPU_REPACK`, `CUDA0`, `RPC0[…]`).
    pub buffer: String,
    /// How it can be written.
    pub access: Access,
    /// Where it lies in a file, for a view of a file mapping.
    pub file: Option<FileSpan>,
}

/// Where a file view's bytes lie in the file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileSpan {
    /// The mapped file.
    pub path: String,
    /// The tensor's first byte's offset in it.
    pub offset: u64,
}

/// How a tensor's bytes can be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// A view of a read-only file mapping: patch the file, which the view shows.
    FileView,
    /// A host buffer: partial writes and reads.
    Host,
    /// A device buffer (a GPU's memory): partial writes and reads, copied by the backend.
    Device,
    /// A remote buffer (ggml's RPC backend): partial writes and reads travel to the remote
    /// server.
    Remote,
    /// A buffer that re-packs what it is given (`CPU_REPACK`, `AMX`): whole-tensor writes
    /// only, no reads.
    WholeTensor,
}

impl Access {
    /// Whether a write may cover part of the tensor.
    pub fn partial_writes(self) -> bool {
        matches!(self, Access::Host | Access::Device | Access::Remote)
    }

    /// Whether the agent can write it at all (a file view is patched through the file).
    pub fn writable(self) -> bool {
        self != Access::FileView
    }

    /// Whether its bytes can be read back in the file's layout.
    pub fn readable(self) -> bool {
        self != Access::WholeTensor
    }

    /// A short description for listings.
    pub fn describe(self) -> &'static str {
        match self {
            Access::FileView => "file mapping (patched through the file)",
            Access::Host => "agent, partial write (host buffer)",
            Access::Device => "agent, partial write (device buffer)",
            Access::Remote => "agent, partial write (remote RPC buffer)",
            Access::WholeTensor => "agent, whole-tensor re-set (repacked buffer)",
        }
    }
}

/// A refusal, with a kind a program can act on.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind:?}: {message}")]
pub struct AgentError {
    /// What went wrong.
    pub kind: AgentErrorKind,
    /// The details.
    pub message: String,
}

impl AgentError {
    /// An error of `kind`.
    pub fn new(kind: AgentErrorKind, message: impl Into<String>) -> AgentError {
        AgentError {
            kind,
            message: message.into(),
        }
    }
}

/// The kinds of [`AgentError`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum AgentErrorKind {
    /// The frame or its JSON could not be read.
    Malformed,
    /// A length is over its bound.
    Oversized,
    /// The protocol versions differ.
    Protocol,
    /// No weight tensor has this name.
    UnknownTensor,
    /// A range leaves its tensor.
    OutOfRange,
    /// A partial write to a buffer that only takes whole tensors.
    WholeTensorOnly,
    /// A write to a view of a read-only file mapping.
    FileView,
    /// A read of a buffer whose bytes are not in the file's layout.
    NotReadable,
    /// The peer is not the agent's user.
    PeerRefused,
    /// The agent is inert (ggml's layout is not the one it was built for, or it was not
    /// set up); it patches nothing.
    Inert,
    /// No forward-pass entry point was seen, so a write could not be kept off a pass.
    NoPassSeen,
}

/// A frame that could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// The socket failed.
    #[error("agent socket")]
    Io(#[from] io::Error),
    /// The stream ended inside a frame.
    #[error("the frame ended early (after {got} of {want} bytes)")]
    Truncated {
        /// Bytes read.
        got: u64,
        /// Bytes expected.
        want: u64,
    },
    /// A length is over its bound.
    #[error("{what} of {len} bytes is over the limit of {max}")]
    Oversized {
        /// Which length.
        what: &'static str,
        /// Its value.
        len: u64,
        /// The bound.
        max: u64,
    },
    /// The header is not the JSON expected.
    #[error("malformed header")]
    Malformed(#[source] serde_json::Error),
}

/// A frame's prefix and header, read; its data is still in the stream.
#[derive(Debug)]
pub struct FrameHead {
    /// The JSON header.
    pub header: Vec<u8>,
    /// Bytes of data that follow.
    pub data_len: u64,
}

impl FrameHead {
    /// The header parsed as `T`.
    pub fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, FrameError> {
        serde_json::from_slice(&self.header).map_err(FrameError::Malformed)
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => {
                return Err(FrameError::Truncated {
                    got: got as u64,
                    want: buf.len() as u64,
                });
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(FrameError::Io(e)),
        }
    }
    Ok(())
}

/// Reads a frame's prefix and header. `Ok(None)` when the stream ends before a frame.
pub fn read_head(r: &mut impl Read) -> Result<Option<FrameHead>, FrameError> {
    let mut prefix = [0u8; 12];
    match read_full(r, &mut prefix) {
        Ok(()) => {}
        Err(FrameError::Truncated { got: 0, .. }) => return Ok(None),
        Err(e) => return Err(e),
    }
    let header_len = u32::from_le_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
    let mut data = [0u8; 8];
    data.copy_from_slice(&prefix[4..12]);
    let data_len = u64::from_le_bytes(data);
    if header_len > MAX_HEADER {
        return Err(FrameError::Oversized {
            what: "header",
            len: header_len.into(),
            max: MAX_HEADER.into(),
        });
    }
    let mut header = vec![0u8; header_len as usize];
    read_full(r, &mut header)?;
    Ok(Some(FrameHead { header, data_len }))
}

/// Reads `len` data bytes, refusing more than `max`.
pub fn read_data(r: &mut impl Read, len: u64, max: u64) -> Result<Vec<u8>, FrameError> {
    if len > max {
        return Err(FrameError::Oversized {
            what: "data",
            len,
            max,
        });
    }
    let len = usize::try_from(len).map_err(|_| FrameError::Oversized {
        what: "data",
        len,
        max: usize::MAX as u64,
    })?;
    let mut data = vec![0u8; len];
    read_full(r, &mut data)?;
    Ok(data)
}

/// Skips `len` data bytes (of a frame whose request was refused).
pub fn skip_data(r: &mut impl Read, len: u64) -> Result<(), FrameError> {
    let copied = io::copy(&mut r.take(len), &mut io::sink())?;
    if copied < len {
        return Err(FrameError::Truncated {
            got: copied,
            want: len,
        });
    }
    Ok(())
}

/// Writes a frame: `header` as JSON, then `data`.
pub fn write_frame(
    w: &mut impl Write,
    header: &impl Serialize,
    data: &[&[u8]],
) -> Result<(), FrameError> {
    let json = serde_json::to_vec(header).map_err(FrameError::Malformed)?;
    let header_len = u32::try_from(json.len())
        .ok()
        .filter(|&n| n <= MAX_HEADER)
        .ok_or(FrameError::Oversized {
            what: "header",
            len: json.len() as u64,
            max: MAX_HEADER.into(),
        })?;
    let data_len: u64 = data.iter().map(|d| d.len() as u64).sum();
    let mut prefix = [0u8; 12];
    prefix[..4].copy_from_slice(&header_len.to_le_bytes());
    prefix[4..].copy_from_slice(&data_len.to_le_bytes());
    w.write_all(&prefix)?;
    w.write_all(&json)?;
    for d in data {
        w.write_all(d)?;
    }
    w.flush()?;
    Ok(())
}
