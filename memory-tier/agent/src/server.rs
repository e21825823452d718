//! The control socket: a Unix socket at `$HOTPATCH_AGENT_SOCKET`, mode 0600, that
//! accepts only this process's user and answers the requests of
//! `memory_tier::agent::proto`. Every request is read whole and checked before anything
//! is written, so a malformed, oversized, truncated or refused request writes nothing,
//! and the server keeps serving.

use std::ffi::c_void;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use memory_tier::agent::proto::{
    self, AgentError, AgentErrorKind, FrameError, Hello, Reply, Request, WriteReport, WriteSpec,
};

use crate::ffi::{self, real};
use crate::state::Agent;

/// Connections served at once; more are refused with an error reply.
const MAX_CONNECTIONS: usize = 16;

/// Starts the control thread, if `HOTPATCH_AGENT_SOCKET` names a socket path.
pub fn start(agent: &'static Agent) {
    let Some(path) = std::env::var_os(proto::SOCKET_ENV).map(PathBuf::from) else {
        eprintln!(
            "hotpatch agent: {} is not set; forwarding every call, with no control socket",
            proto::SOCKET_ENV
        );
        return;
    };
    // A socket left by an earlier run is replaced; anything else at the path is kept.
    if let Ok(meta) = std::fs::symlink_metadata(&path) {
        if !meta.file_type().is_socket() {
            eprintln!(
                "hotpatch agent: {} exists and is not a socket; not listening",
                path.display()
            );
            return;
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = match UnixListener::bind(&path) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hotpatch agent: cannot listen on {}: {e}", path.display());
            return;
        }
    };
    if let Err(e) = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)) {
        eprintln!(
            "hotpatch agent: cannot make {} private: {e}; not listening",
            path.display()
        );
        let _ = std::fs::remove_file(&path);
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("hotpatch-agent".into())
        .spawn(move || accept_loop(agent, listener));
    if let Err(e) = spawned {
        eprintln!("hotpatch agent: cannot start the control thread: {e}");
    }
}

fn accept_loop(agent: &'static Agent, listener: UnixListener) {
    static OPEN: AtomicUsize = AtomicUsize::new(0);
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        if OPEN.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            OPEN.fetch_sub(1, Ordering::SeqCst);
            let _ = reply_error(
                &mut stream,
                AgentErrorKind::Oversized,
                format!("{MAX_CONNECTIONS} connections are open already"),
            );
            continue;
        }
        let spawned = std::thread::Builder::new()
            .name("hotpatch-agent-conn".into())
            .spawn(move || {
                serve(agent, stream);
                OPEN.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            OPEN.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The peer's user id.
fn peer_uid(stream: &UnixStream) -> Option<u32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: SO_PEERCRED fills a `struct ucred` of `len` bytes on a connected Unix
    // socket; both pointers are to live locals of the right size.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast::<c_void>(),
            &mut len,
        )
    };
    (rc == 0).then_some(cred.uid)
}

fn reply(stream: &mut UnixStream, reply: &Reply, data: &[&[u8]]) -> Result<(), FrameError> {
    proto::write_frame(stream, reply, data)
}

fn reply_error(
    stream: &mut UnixStream,
    kind: AgentErrorKind,
    message: impl Into<String>,
) -> Result<(), FrameError> {
    reply(stream, &Reply::Error(AgentError::new(kind, message)), &[])
}

fn serve(agent: &'static Agent, mut stream: UnixStream) {
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    match peer_uid(&stream) {
        Some(uid) if uid == me => {}
        other => {
            let who = other.map_or("unknown".to_owned(), |u| u.to_string());
            let _ = reply_error(
                &mut stream,
                AgentErrorKind::PeerRefused,
                format!("the peer's user {who} is not the server's user {me}"),
            );
            return;
        }
    }
    // A client that stops in the middle of a frame is dropped after this long; what it
    // sent is discarded, so nothing is half-written.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    loop {
        let head = match proto::read_head(&mut stream) {
            Ok(Some(head)) => head,
            Ok(None) => return,
            Err(FrameError::Oversized { what, len, max }) => {
                let _ = reply_error(
                    &mut stream,
                    AgentErrorKind::Oversized,
                    format!("{what} of {len} bytes is over the limit of {max}"),
                );
                return;
            }
            Err(_) => return,
        };
        let request: Request = match head.parse() {
            Ok(r) => r,
            Err(e) => {
                let sent = proto::skip_data(&mut stream, head.data_len).and_then(|()| {
                    reply_error(&mut stream, AgentErrorKind::Malformed, e.to_string())
                });
                if sent.is_err() {
                    return;
                }
                continue;
            }
        };
        if handle(agent, &mut stream, request, head.data_len).is_err() {
            return;
        }
    }
}

fn refuse(kind: AgentErrorKind, message: impl Into<String>) -> AgentError {
    AgentError::new(kind, message)
}

fn handle(
    agent: &'static Agent,
    stream: &mut UnixStream,
    request: Request,
    data_len: u64,
) -> Result<(), FrameError> {
    // Only a write carries data.
    if !matches!(request, Request::Write { .. }) && data_len != 0 {
        proto::skip_data(stream, data_len)?;
        return reply_error(
            stream,
            AgentErrorKind::Malformed,
            "this request carries no data",
        );
    }
    match request {
        Request::Hello { .. } => {
            let (llama_build, llama_commit) = ffi::llama_build();
            let hello = Hello {
                agent: env!("CARGO_PKG_VERSION").to_owned(),
                protocol: proto::PROTOCOL,
                ggml: ffi::call_str(real().ggml_version),
                ggml_commit: ffi::call_str(real().ggml_commit),
                llama_build,
                llama_commit,
                pid: std::process::id(),
                inert: crate::inert().map(str::to_owned),
                entry_points: agent.entry_points(),
                tensors: agent.registry().seen.len(),
                passes: agent.counters(),
            };
            reply(stream, &Reply::Hello(hello), &[])
        }
        Request::Tensors => {
            let tensors = agent
                .registry()
                .seen
                .iter()
                .map(|s| s.entry.clone())
                .collect();
            reply(stream, &Reply::Tensors { tensors }, &[])
        }
        Request::Write { writes } => match check_writes(agent, &writes, data_len) {
            Err(e) => {
                proto::skip_data(stream, data_len)?;
                reply(stream, &Reply::Error(e), &[])
            }
            Ok(()) => {
                let data = proto::read_data(stream, data_len, data_len)?;
                match write(agent, &writes, &data) {
                    Ok(report) => reply(stream, &Reply::Written(report), &[]),
                    Err(e) => reply(stream, &Reply::Error(e), &[]),
                }
            }
        },
        Request::Read {
            tensor,
            offset,
            len,
        } => match read(agent, &tensor, offset, len) {
            Ok(bytes) => reply(
                stream,
                &Reply::Data {
                    len: bytes.len() as u64,
                },
                &[&bytes],
            ),
            Err(e) => reply(stream, &Reply::Error(e), &[]),
        },
        Request::Barrier => {
            let hold = agent.gate.hold();
            synchronize(agent);
            agent.last_wait_us.store(hold.waited_us, Ordering::SeqCst);
            drop(hold);
            reply(stream, &Reply::Passes(agent.counters()), &[])
        }
        Request::PutRecord { key, record } => {
            let mut records = agent.records();
            match records.iter_mut().find(|(k, _)| *k == key) {
                Some(slot) => slot.1 = record,
                None => records.push((key, record)),
            }
            drop(records);
            reply(stream, &Reply::Done, &[])
        }
        Request::DropRecord { key } => {
            agent.records().retain(|(k, _)| *k != key);
            reply(stream, &Reply::Done, &[])
        }
        Request::Records => {
            let records = agent.records().clone();
            reply(stream, &Reply::Records { records }, &[])
        }
    }
}

/// Checks a write batch against the tensors before a byte of it is read.
fn check_writes(agent: &Agent, writes: &[WriteSpec], data_len: u64) -> Result<(), AgentError> {
    if let Some(why) = crate::inert() {
        return Err(refuse(AgentErrorKind::Inert, why));
    }
    if agent.entry_points().is_empty() {
        return Err(refuse(
            AgentErrorKind::NoPassSeen,
            "no forward pass has run through llama_process, llama_decode or llama_encode yet, so a write could not be kept off a pass",
        ));
    }
    let registry = agent.registry();
    let mut total: u64 = 0;
    for w in writes {
        let seen = registry.get(&w.tensor).ok_or_else(|| {
            refuse(
                AgentErrorKind::UnknownTensor,
                format!("no weight tensor named {:?} was placed", w.tensor),
            )
        })?;
        let e = &seen.entry;
        let end = w.offset.checked_add(w.len);
        if end.is_none_or(|end| end > e.nbytes) || w.len == 0 {
            return Err(refuse(
                AgentErrorKind::OutOfRange,
                format!(
                    "bytes {}..+{} of {:?} are outside its {} bytes",
                    w.offset, w.len, w.tensor, e.nbytes
                ),
            ));
        }
        if !e.access.writable() {
            return Err(refuse(
                AgentErrorKind::FileView,
                format!(
                    "{:?} is a view of the read-only file mapping; patch the file instead",
                    w.tensor
                ),
            ));
        }
        if !e.access.partial_writes() && (w.offset != 0 || w.len != e.nbytes) {
            return Err(refuse(
                AgentErrorKind::WholeTensorOnly,
                format!(
                    "{:?} lives in {}, which re-packs what it is given: write all {} bytes at offset 0",
                    w.tensor, e.buffer, e.nbytes
                ),
            ));
        }
        total += w.len;
    }
    if total != data_len {
        return Err(refuse(
            AgentErrorKind::Malformed,
            format!("the writes cover {total} bytes but the frame carries {data_len}"),
        ));
    }
    Ok(())
}

/// Waits for the backend to finish every pass it queued.
fn synchronize(agent: &Agent) {
    if let Some(sync) = real().synchronize {
        for ctx in agent.contexts() {
            // SAFETY: ctx is a live llama_context (llama_free removes it from the list
            // under the gate, which the caller holds).
            unsafe { sync(ctx as *mut c_void) };
        }
    }
}

/// Carries out a checked write batch between two passes.
fn write(agent: &Agent, writes: &[WriteSpec], data: &[u8]) -> Result<WriteReport, AgentError> {
    let Some(set) = real().tensor_set else {
        return Err(refuse(
            AgentErrorKind::Inert,
            "ggml_backend_tensor_set is not in this process",
        ));
    };
    let hold = agent.gate.hold();
    synchronize(agent);
    let registry = agent.registry();
    let mut at = 0usize;
    let mut bytes = 0u64;
    for w in writes {
        // Checked by `check_writes`; the registry only grows while the model lives, and
        // it is cleared under the gate, which this batch holds.
        let Some(seen) = registry.get(&w.tensor) else {
            return Err(refuse(
                AgentErrorKind::UnknownTensor,
                format!("{:?} was freed", w.tensor),
            ));
        };
        let len = w.len as usize;
        if agent.gate.running.load(Ordering::SeqCst) > 0 {
            agent.writes_during_pass.fetch_add(1, Ordering::SeqCst);
        }
        // SAFETY: the tensor is a live, allocated weight tensor (placed by the server,
        // not freed: see above); offset + len is within ggml_nbytes (checked); the data
        // slice holds len bytes; no pass runs (the gate is held) and the backend is
        // synchronized.
        unsafe {
            set(
                seen.tensor as *mut ffi::Tensor,
                data[at..at + len].as_ptr().cast(),
                w.offset as usize,
                len,
            )
        };
        at += len;
        bytes += w.len;
        agent.writes.fetch_add(1, Ordering::SeqCst);
        agent.bytes.fetch_add(w.len, Ordering::SeqCst);
    }
    drop(registry);
    let waited_us = hold.waited_us;
    agent.last_wait_us.store(waited_us, Ordering::SeqCst);
    drop(hold);
    Ok(WriteReport {
        writes: writes.len() as u64,
        bytes,
        waited_us,
        passes: agent.counters(),
    })
}

/// Reads bytes of a tensor whose buffer holds them in the file's layout.
fn read(agent: &Agent, tensor: &str, offset: u64, len: u64) -> Result<Vec<u8>, AgentError> {
    if let Some(why) = crate::inert() {
        return Err(refuse(AgentErrorKind::Inert, why));
    }
    let Some(get) = real().tensor_get else {
        return Err(refuse(
            AgentErrorKind::Inert,
            "ggml_backend_tensor_get is not in this process",
        ));
    };
    let hold = agent.gate.hold();
    synchronize(agent);
    let registry = agent.registry();
    let seen = registry.get(tensor).ok_or_else(|| {
        refuse(
            AgentErrorKind::UnknownTensor,
            format!("no weight tensor named {tensor:?} was placed"),
        )
    })?;
    if !seen.entry.access.readable() {
        return Err(refuse(
            AgentErrorKind::NotReadable,
            format!(
                "{tensor:?} lives in {}, which holds it re-packed: read the file instead",
                seen.entry.buffer
            ),
        ));
    }
    if offset
        .checked_add(len)
        .is_none_or(|end| end > seen.entry.nbytes)
    {
        return Err(refuse(
            AgentErrorKind::OutOfRange,
            format!(
                "bytes {offset}..+{len} of {tensor:?} are outside its {} bytes",
                seen.entry.nbytes
            ),
        ));
    }
    let mut out = vec![0u8; len as usize];
    // SAFETY: the tensor is live and allocated; offset + len is within its bytes; `out`
    // holds len bytes; the gate keeps writes out.
    unsafe {
        get(
            seen.tensor as *const ffi::Tensor,
            out.as_mut_ptr().cast(),
            offset as usize,
            len as usize,
        )
    };
    drop(registry);
    drop(hold);
    Ok(out)
}
