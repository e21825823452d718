//! A client of the agent's control socket.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::proto::{
    self, FrameError, Hello, PassCounters, Reply, Request, TensorEntry, WriteReport, WriteSpec,
};
use crate::error::{Error, Result};

/// A connection to the agent inside a llama-server.
#[derive(Debug)]
pub struct AgentClient {
    stream: UnixStream,
    socket: PathBuf,
}

fn frame_error(socket: &Path, source: FrameError) -> Error {
    Error::AgentChannel {
        socket: socket.to_path_buf(),
        source,
    }
}

impl AgentClient {
    /// Connects to the agent listening on `socket` and checks that it speaks this
    /// protocol and is not inert.
    pub fn connect(socket: impl AsRef<Path>) -> Result<(AgentClient, Hello)> {
        let socket = socket.as_ref().to_path_buf();
        let stream = UnixStream::connect(&socket).map_err(|source| Error::AgentConnect {
            socket: socket.clone(),
            source,
        })?;
        // A write batch may wait for a long prompt's pass to end; five minutes is the
        // bound past which the agent is taken for dead.
        let timeout = Some(Duration::from_secs(300));
        for result in [
            stream.set_read_timeout(timeout),
            stream.set_write_timeout(timeout),
        ] {
            result.map_err(|source| Error::AgentConnect {
                socket: socket.clone(),
                source,
            })?;
        }
        let mut client = AgentClient { stream, socket };
        let hello = match client.call(
            &Request::Hello {
                protocol: proto::PROTOCOL,
            },
            &[],
        )? {
            (Reply::Hello(hello), _) => hello,
            (other, _) => return Err(client.unexpected(&other)),
        };
        if hello.protocol != proto::PROTOCOL {
            return Err(Error::AgentRefused(proto::AgentError::new(
                proto::AgentErrorKind::Protocol,
                format!(
                    "the agent speaks protocol {}, this client {}",
                    hello.protocol,
                    proto::PROTOCOL
                ),
            )));
        }
        Ok((client, hello))
    }

    /// The socket's path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    fn unexpected(&self, reply: &Reply) -> Error {
        Error::AgentRefused(proto::AgentError::new(
            proto::AgentErrorKind::Malformed,
            format!("unexpected reply from {}: {reply:?}", self.socket.display()),
        ))
    }

    /// Sends one request and reads its reply; an error reply becomes `Err`.
    fn call(&mut self, request: &Request, data: &[&[u8]]) -> Result<(Reply, Vec<u8>)> {
        if let Err(write) = proto::write_frame(&mut self.stream, request, data) {
            // An agent that refuses a peer answers at once and closes, so the request may
            // meet a closed socket: its answer, when there is one, says why.
            if let Ok(Some(head)) = proto::read_head(&mut self.stream)
                && let Ok(Reply::Error(e)) = head.parse()
            {
                return Err(Error::AgentRefused(e));
            }
            return Err(frame_error(&self.socket, write));
        }
        let head = proto::read_head(&mut self.stream)
            .map_err(|e| frame_error(&self.socket, e))?
            .ok_or_else(|| frame_error(&self.socket, FrameError::Truncated { got: 0, want: 12 }))?;
        let reply: Reply = head.parse().map_err(|e| frame_error(&self.socket, e))?;
        let max = match (&reply, request) {
            (Reply::Data { len }, Request::Read { len: asked, .. }) => (*len).min(*asked),
            _ => 0,
        };
        let bytes = proto::read_data(&mut self.stream, head.data_len, max)
            .map_err(|e| frame_error(&self.socket, e))?;
        match reply {
            Reply::Error(e) => Err(Error::AgentRefused(e)),
            reply => Ok((reply, bytes)),
        }
    }

    /// Versions and state.
    pub fn hello(&mut self) -> Result<Hello> {
        match self.call(
            &Request::Hello {
                protocol: proto::PROTOCOL,
            },
            &[],
        )? {
            (Reply::Hello(hello), _) => Ok(hello),
            (other, _) => Err(self.unexpected(&other)),
        }
    }

    /// Every weight tensor the agent saw placed.
    pub fn tensors(&mut self) -> Result<Vec<TensorEntry>> {
        match self.call(&Request::Tensors, &[])? {
            (Reply::Tensors { tensors }, _) => Ok(tensors),
            (other, _) => Err(self.unexpected(&other)),
        }
    }

    /// Writes `writes` (spec and bytes each) between the same two forward passes: all of
    /// them, or none when the agent refuses one.
    pub fn write(&mut self, writes: &[(WriteSpec, &[u8])]) -> Result<WriteReport> {
        let specs: Vec<WriteSpec> = writes.iter().map(|(s, _)| s.clone()).collect();
        let data: Vec<&[u8]> = writes.iter().map(|(_, d)| *d).collect();
        match self.call(&Request::Write { writes: specs }, &data)? {
            (Reply::Written(report), _) => Ok(report),
            (other, _) => Err(self.unexpected(&other)),
        }
    }

    /// Reads `len` bytes of `tensor` at `offset`.
    pub fn read(&mut self, tensor: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let request = Request::Read {
            tensor: tensor.to_owned(),
            offset,
            len,
        };
        match self.call(&request, &[])? {
            (Reply::Data { len: got }, bytes) if got == len && bytes.len() as u64 == len => {
                Ok(bytes)
            }
            (other, _) => Err(self.unexpected(&other)),
        }
    }

    /// Waits for a pass boundary; answers the pass counters.
    pub fn barrier(&mut self) -> Result<PassCounters> {
        match self.call(&Request::Barrier, &[])? {
            (Reply::Passes(counters), _) => Ok(counters),
            (other, _) => Err(self.unexpected(&other)),
        }
    }

    /// Keeps `record` under `key` in the agent.
    pub fn put_record(&mut self, key: &str, record: serde_json::Value) -> Result<()> {
        let request = Request::PutRecord {
            key: key.to_owned(),
            record,
        };
        match self.call(&request, &[])? {
            (Reply::Done, _) => Ok(()),
            (other, _) => Err(self.unexpected(&other)),
        }
    }

    /// Drops the record under `key`.
    pub fn drop_record(&mut self, key: &str) -> Result<()> {
        match self.call(
            &Request::DropRecord {
                key: key.to_owned(),
            },
            &[],
        )? {
            (Reply::Done, _) => Ok(()),
            (other, _) => Err(self.unexpected(&other)),
        }
    }

    /// Every record kept, oldest first.
    pub fn records(&mut self) -> Result<Vec<(String, serde_json::Value)>> {
        match self.call(&Request::Records, &[])? {
            (Reply::Records { records }, _) => Ok(records),
            (other, _) => Err(self.unexpected(&other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An agent that refuses a peer answers before reading anything and closes; the
    /// client's request then meets a closed socket, and the answer must still come
    /// through as the refusal, never as a broken pipe (which the CLI treats as a closed
    /// stdout, exit 0).
    #[test]
    fn a_refusal_sent_before_the_request_is_read_is_reported_as_the_refusal() {
        let (client_end, mut agent_end) = UnixStream::pair().unwrap();
        let refusal = Reply::Error(proto::AgentError::new(
            proto::AgentErrorKind::PeerRefused,
            "the peer's user 65534 is not the server's user 0",
        ));
        proto::write_frame(&mut agent_end, &refusal, &[]).unwrap();
        drop(agent_end);
        let mut client = AgentClient {
            stream: client_end,
            socket: PathBuf::from("agent.sock"),
        };
        let request = Request::Hello {
            protocol: proto::PROTOCOL,
        };
        match client.call(&request, &[]) {
            Err(Error::AgentRefused(e)) => {
                assert_eq!(e.kind, proto::AgentErrorKind::PeerRefused);
            }
            other => panic!("expected the refusal, got {other:?}"),
        }
    }
}
