//! A small etcd v3 client over gRPC: the KV, Txn, Watch and Lease calls a fleet uses.
//!
//! The messages are the subset of etcd's `etcdserverpb` and `mvccpb` wire schema that
//! these calls read and write, declared as prost messages with etcd's field numbers
//! (protobuf skips fields a reader does not declare), and sent with tonic's generic
//! gRPC client to etcd's service paths. Declaring them here rather than compiling
//! etcd's `.proto` files at build time keeps `protoc` out of the build: the workspace
//! builds on a machine with a Rust toolchain and nothing else.
//!
//! Facts of etcd 3.4 this client is built around: connecting is lazy, so the first call
//! is what finds a dead member; a member that dies keeps receiving the calls sent to it,
//! which fail with `Unavailable`, so every unary call rotates to the next endpoint and
//! retries; a watch or keep-alive stream on a killed member just ends, so its owner
//! opens it again on another endpoint (a watch from the last revision seen plus one).

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use http::uri::PathAndQuery;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_prost::ProstCodec;

use crate::error::{Error, Result};

/// etcd's `ResponseHeader`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResponseHeader {
    /// The cluster.
    #[prost(uint64, tag = "1")]
    pub cluster_id: u64,
    /// The member that answered.
    #[prost(uint64, tag = "2")]
    pub member_id: u64,
    /// The store's revision when the request was applied.
    #[prost(int64, tag = "3")]
    pub revision: i64,
    /// The raft term.
    #[prost(uint64, tag = "4")]
    pub raft_term: u64,
}

/// mvccpb's `KeyValue`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    /// The key.
    #[prost(bytes = "vec", tag = "1")]
    pub key: Vec<u8>,
    /// The revision that created it.
    #[prost(int64, tag = "2")]
    pub create_revision: i64,
    /// The revision that last changed it.
    #[prost(int64, tag = "3")]
    pub mod_revision: i64,
    /// How many times it changed since it was created.
    #[prost(int64, tag = "4")]
    pub version: i64,
    /// The value.
    #[prost(bytes = "vec", tag = "5")]
    pub value: Vec<u8>,
    /// The lease it is bound to (0: none).
    #[prost(int64, tag = "6")]
    pub lease: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    range_end: Vec<u8>,
    #[prost(int64, tag = "3")]
    limit: i64,
    #[prost(int64, tag = "4")]
    revision: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RangeResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(message, repeated, tag = "2")]
    kvs: Vec<KeyValue>,
    #[prost(bool, tag = "3")]
    more: bool,
    #[prost(int64, tag = "4")]
    count: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    value: Vec<u8>,
    #[prost(int64, tag = "3")]
    lease: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct PutResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DeleteRangeRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    range_end: Vec<u8>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct DeleteRangeResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    deleted: i64,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Request {
    #[prost(message, tag = "1")]
    Range(RangeRequest),
    #[prost(message, tag = "2")]
    Put(PutRequest),
    #[prost(message, tag = "3")]
    DeleteRange(DeleteRangeRequest),
}

#[derive(Clone, PartialEq, prost::Message)]
struct RequestOp {
    #[prost(oneof = "Request", tags = "1, 2, 3")]
    request: Option<Request>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Response {
    #[prost(message, tag = "1")]
    Range(RangeResponse),
    #[prost(message, tag = "2")]
    Put(PutResponse),
    #[prost(message, tag = "3")]
    DeleteRange(DeleteRangeResponse),
}

#[derive(Clone, PartialEq, prost::Message)]
struct ResponseOp {
    #[prost(oneof = "Response", tags = "1, 2, 3")]
    response: Option<Response>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum CompareTargetUnion {
    #[prost(int64, tag = "4")]
    Version(i64),
    #[prost(int64, tag = "5")]
    CreateRevision(i64),
    #[prost(int64, tag = "6")]
    ModRevision(i64),
    #[prost(bytes = "vec", tag = "7")]
    Value(Vec<u8>),
}

#[derive(Clone, PartialEq, prost::Message)]
struct CompareMessage {
    /// 0 equal, 1 greater, 2 less, 3 not equal.
    #[prost(int32, tag = "1")]
    result: i32,
    /// 0 version, 1 create revision, 2 mod revision, 3 value.
    #[prost(int32, tag = "2")]
    target: i32,
    #[prost(bytes = "vec", tag = "3")]
    key: Vec<u8>,
    #[prost(oneof = "CompareTargetUnion", tags = "4, 5, 6, 7")]
    target_union: Option<CompareTargetUnion>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TxnRequest {
    #[prost(message, repeated, tag = "1")]
    compare: Vec<CompareMessage>,
    #[prost(message, repeated, tag = "2")]
    success: Vec<RequestOp>,
    #[prost(message, repeated, tag = "3")]
    failure: Vec<RequestOp>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct TxnResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(bool, tag = "2")]
    succeeded: bool,
    #[prost(message, repeated, tag = "3")]
    responses: Vec<ResponseOp>,
}

/// mvccpb's `Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    /// 0 put, 1 delete.
    #[prost(int32, tag = "1")]
    pub kind: i32,
    /// The key after the event (for a delete, only the key and the revision).
    #[prost(message, optional, tag = "2")]
    pub kv: Option<KeyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WatchCreateRequest {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    range_end: Vec<u8>,
    #[prost(int64, tag = "3")]
    start_revision: i64,
    #[prost(bool, tag = "4")]
    progress_notify: bool,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum WatchRequestUnion {
    #[prost(message, tag = "1")]
    Create(WatchCreateRequest),
}

#[derive(Clone, PartialEq, prost::Message)]
struct WatchRequest {
    #[prost(oneof = "WatchRequestUnion", tags = "1")]
    request_union: Option<WatchRequestUnion>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct WatchResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    watch_id: i64,
    #[prost(bool, tag = "3")]
    created: bool,
    #[prost(bool, tag = "4")]
    canceled: bool,
    #[prost(int64, tag = "5")]
    compact_revision: i64,
    #[prost(string, tag = "6")]
    cancel_reason: String,
    #[prost(message, repeated, tag = "11")]
    events: Vec<Event>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseGrantRequest {
    #[prost(int64, tag = "1")]
    ttl: i64,
    #[prost(int64, tag = "2")]
    id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseGrantResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    id: i64,
    #[prost(int64, tag = "3")]
    ttl: i64,
    #[prost(string, tag = "4")]
    error: String,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseRevokeRequest {
    #[prost(int64, tag = "1")]
    id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseRevokeResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseKeepAliveRequest {
    #[prost(int64, tag = "1")]
    id: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct LeaseKeepAliveResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(int64, tag = "2")]
    id: i64,
    #[prost(int64, tag = "3")]
    ttl: i64,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StatusRequest {}

#[derive(Clone, PartialEq, prost::Message)]
struct StatusResponse {
    #[prost(message, optional, tag = "1")]
    header: Option<ResponseHeader>,
    #[prost(string, tag = "2")]
    version: String,
    #[prost(int64, tag = "3")]
    db_size: i64,
    #[prost(uint64, tag = "4")]
    leader: u64,
}

/// A condition of a transaction.
#[derive(Clone, Debug, PartialEq)]
pub enum Compare {
    /// The key does not exist.
    Absent(Vec<u8>),
    /// The key was last changed at this revision (0: it does not exist).
    ModRevision(Vec<u8>, i64),
    /// The key holds this value.
    Value(Vec<u8>, Vec<u8>),
}

impl Compare {
    fn message(&self) -> CompareMessage {
        match self {
            Compare::Absent(key) => CompareMessage {
                result: 0,
                target: 0,
                key: key.clone(),
                target_union: Some(CompareTargetUnion::Version(0)),
            },
            Compare::ModRevision(key, revision) => CompareMessage {
                result: 0,
                target: 2,
                key: key.clone(),
                target_union: Some(CompareTargetUnion::ModRevision(*revision)),
            },
            Compare::Value(key, value) => CompareMessage {
                result: 0,
                target: 3,
                key: key.clone(),
                target_union: Some(CompareTargetUnion::Value(value.clone())),
            },
        }
    }
}

/// A write of a transaction.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    /// Put a value (bound to a lease when it is not 0).
    Put {
        /// The key.
        key: Vec<u8>,
        /// The value.
        value: Vec<u8>,
        /// The lease (0: none).
        lease: i64,
    },
    /// Delete a key.
    Delete(Vec<u8>),
    /// Delete every key under a prefix.
    DeletePrefix(Vec<u8>),
}

impl Op {
    /// Put `value` at `key`, bound to no lease.
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Op {
        Op::Put {
            key: key.into(),
            value: value.into(),
            lease: 0,
        }
    }

    fn message(&self) -> RequestOp {
        let request = match self {
            Op::Put { key, value, lease } => Request::Put(PutRequest {
                key: key.clone(),
                value: value.clone(),
                lease: *lease,
            }),
            Op::Delete(key) => Request::DeleteRange(DeleteRangeRequest {
                key: key.clone(),
                range_end: Vec::new(),
            }),
            Op::DeletePrefix(prefix) => Request::DeleteRange(DeleteRangeRequest {
                key: prefix.clone(),
                range_end: prefix_end(prefix),
            }),
        };
        RequestOp {
            request: Some(request),
        }
    }
}

/// The first key after every key that starts with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff: the range reaches the end of the key space.
    vec![0]
}

/// Keys read at one revision.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// The store's revision of the read.
    pub revision: i64,
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
}

/// What a watch delivered.
#[derive(Debug)]
pub enum WatchItem {
    /// Events, with the revision of the last one.
    Events(Vec<Event>),
    /// The stream ended (its member died, or etcd cancelled it); `compacted` is the
    /// revision etcd has compacted past when that was the reason.
    Ended {
        /// The compaction revision, when the start revision was compacted away.
        compacted: Option<i64>,
    },
}

/// How many times a unary call tries, rotating endpoints between tries.
const ATTEMPTS_PER_ENDPOINT: usize = 3;

/// A client of an etcd cluster: one lazily connected channel per endpoint, and the
/// endpoint calls go to now.
#[derive(Debug)]
pub struct EtcdClient {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    current: AtomicUsize,
    /// Calls made (a unary call and each retry count one; a stream opened counts one).
    requests: AtomicUsize,
}

/// TLS for the connection to etcd (`https://` endpoints): the CA that vouches for the
/// members' certificates (the system's roots when none is given), and the client
/// certificate and key a cluster started with `--client-cert-auth` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EtcdTls {
    /// PEM file of the CA that signed the members' certificates.
    pub ca: Option<PathBuf>,
    /// PEM file of this client's certificate.
    pub cert: Option<PathBuf>,
    /// PEM file of this client's private key.
    pub key: Option<PathBuf>,
}

impl EtcdTls {
    /// Whether any TLS option is set.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some() || self.key.is_some()
    }

    /// tonic's client TLS configuration, with every file read and checked.
    fn client_config(&self, endpoints: &str) -> Result<ClientTlsConfig> {
        let read = |path: &PathBuf, what: &str| {
            std::fs::read(path).map_err(|e| Error::Etcd {
                endpoints: endpoints.to_owned(),
                message: format!("read the {what} {}: {e}", path.display()),
            })
        };
        let mut config = ClientTlsConfig::new();
        config = match &self.ca {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read(ca, "etcd CA")?)),
            None => config.with_native_roots(),
        };
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => {
                config = config.identity(Identity::from_pem(
                    read(cert, "etcd client certificate")?,
                    read(key, "etcd client key")?,
                ));
            }
            (None, None) => {}
            _ => {
                return Err(Error::Etcd {
                    endpoints: endpoints.to_owned(),
                    message:
                        "a client certificate and its key go together (--etcd-cert and --etcd-key)"
                            .into(),
                });
            }
        }
        Ok(config)
    }
}

impl EtcdClient {
    /// A client of the cluster at `endpoints` (`http://host:port`, comma-separated or
    /// one per element). Nothing is connected until the first call.
    pub fn new(endpoints: &[String]) -> Result<EtcdClient> {
        EtcdClient::with_tls(endpoints, &EtcdTls::default())
    }

    /// A client of the cluster at `endpoints`, speaking TLS to its `https://` endpoints
    /// as `tls` says. TLS options with an `http://` endpoint are refused rather than
    /// ignored: the operator asked for an encrypted, authenticated connection.
    pub fn with_tls(endpoints: &[String], tls: &EtcdTls) -> Result<EtcdClient> {
        let endpoints: Vec<String> = endpoints
            .iter()
            .flat_map(|e| e.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(|e| {
                if e.contains("://") {
                    e.to_owned()
                } else {
                    format!("http://{e}")
                }
            })
            .collect();
        if endpoints.is_empty() {
            return Err(Error::Etcd {
                endpoints: String::new(),
                message: "no etcd endpoint given".into(),
            });
        }
        let mut channels = Vec::with_capacity(endpoints.len());
        for url in &endpoints {
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|e| Error::Etcd {
                    endpoints: url.clone(),
                    message: format!("not an endpoint URL: {e}"),
                })?
                .connect_timeout(Duration::from_secs(2))
                .timeout(Duration::from_secs(5))
                .tcp_nodelay(true);
            if url.starts_with("https://") {
                endpoint =
                    endpoint
                        .tls_config(tls.client_config(url)?)
                        .map_err(|e| Error::Etcd {
                            endpoints: url.clone(),
                            message: format!("TLS configuration: {e}"),
                        })?;
            } else if tls.is_set() {
                return Err(Error::Etcd {
                    endpoints: url.clone(),
                    message:
                        "TLS options were given for a plain http:// endpoint; name it https://"
                            .into(),
                });
            }
            channels.push(endpoint.connect_lazy());
        }
        Ok(EtcdClient {
            endpoints,
            channels,
            current: AtomicUsize::new(0),
            requests: AtomicUsize::new(0),
        })
    }

    /// The endpoints, as given.
    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// Calls made so far (retries included).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }

    fn unreachable(&self, message: String) -> Error {
        Error::Etcd {
            endpoints: self.endpoints.join(","),
            message,
        }
    }

    /// Moves to the next endpoint after a failure on `index`.
    fn rotate(&self, index: usize) {
        let next = (index + 1) % self.channels.len();
        let _ = self
            .current
            .compare_exchange(index, next, Ordering::AcqRel, Ordering::Acquire);
    }

    async fn unary<Q, R>(&self, path: &'static str, request: Q) -> Result<R>
    where
        Q: prost::Message + Clone + Send + Sync + 'static,
        R: prost::Message + Default + Send + Sync + 'static,
    {
        let attempts = ATTEMPTS_PER_ENDPOINT * self.channels.len();
        let mut last = String::new();
        for attempt in 0..attempts {
            let index = self.current.load(Ordering::Acquire) % self.channels.len();
            self.requests.fetch_add(1, Ordering::Relaxed);
            let mut grpc = tonic::client::Grpc::new(self.channels[index].clone());
            let outcome = match grpc.ready().await {
                Ok(()) => {
                    grpc.unary(
                        tonic::Request::new(request.clone()),
                        PathAndQuery::from_static(path),
                        ProstCodec::<Q, R>::default(),
                    )
                    .await
                }
                Err(error) => Err(tonic::Status::unavailable(error.to_string())),
            };
            match outcome {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) if retryable(&status) => {
                    last = format!("{}: {}", self.endpoints[index], describe(&status));
                    self.rotate(index);
                    if attempt + 1 >= self.channels.len() {
                        // Every endpoint failed once: give the cluster a moment (an
                        // election takes about a second) before the next round.
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                Err(status) => {
                    return Err(self.unreachable(format!("{path}: {}", describe(&status))));
                }
            }
        }
        Err(self.unreachable(format!(
            "{path} failed on every endpoint ({attempts} tries); last: {last}"
        )))
    }

    /// The cluster's status as one endpoint sees it: (member id, leader id).
    pub async fn status_of(&self, index: usize) -> Result<(u64, u64)> {
        let channel = self
            .channels
            .get(index)
            .ok_or_else(|| self.unreachable(format!("no endpoint #{index}")))?;
        let mut grpc = tonic::client::Grpc::new(channel.clone());
        grpc.ready()
            .await
            .map_err(|e| self.unreachable(format!("{}: {e}", self.endpoints[index])))?;
        let response: StatusResponse = grpc
            .unary(
                tonic::Request::new(StatusRequest {}),
                PathAndQuery::from_static("/etcdserverpb.Maintenance/Status"),
                ProstCodec::<StatusRequest, StatusResponse>::default(),
            )
            .await
            .map_err(|s| self.unreachable(format!("{}: {}", self.endpoints[index], describe(&s))))?
            .into_inner();
        let member = response.header.map_or(0, |h| h.member_id);
        Ok((member, response.leader))
    }

    /// Reads one key.
    pub async fn get(&self, key: &[u8]) -> Result<(i64, Option<KeyValue>)> {
        let response: RangeResponse = self
            .unary(
                "/etcdserverpb.KV/Range",
                RangeRequest {
                    key: key.to_vec(),
                    ..RangeRequest::default()
                },
            )
            .await?;
        let revision = response.header.map_or(0, |h| h.revision);
        Ok((revision, response.kvs.into_iter().next()))
    }

    /// Reads every key under `prefix`, at one revision.
    pub async fn get_prefix(&self, prefix: &[u8]) -> Result<Snapshot> {
        let response: RangeResponse = self
            .unary(
                "/etcdserverpb.KV/Range",
                RangeRequest {
                    key: prefix.to_vec(),
                    range_end: prefix_end(prefix),
                    ..RangeRequest::default()
                },
            )
            .await?;
        Ok(Snapshot {
            revision: response.header.map_or(0, |h| h.revision),
            kvs: response.kvs,
        })
    }

    /// Writes one key; returns the revision of the write.
    pub async fn put(&self, key: &[u8], value: &[u8], lease: i64) -> Result<i64> {
        let response: PutResponse = self
            .unary(
                "/etcdserverpb.KV/Put",
                PutRequest {
                    key: key.to_vec(),
                    value: value.to_vec(),
                    lease,
                },
            )
            .await?;
        Ok(response.header.map_or(0, |h| h.revision))
    }

    /// Runs `ops` if every condition holds; returns whether they held, and the revision.
    pub async fn txn(&self, compare: &[Compare], ops: &[Op]) -> Result<(bool, i64)> {
        let response: TxnResponse = self
            .unary(
                "/etcdserverpb.KV/Txn",
                TxnRequest {
                    compare: compare.iter().map(Compare::message).collect(),
                    success: ops.iter().map(Op::message).collect(),
                    failure: Vec::new(),
                },
            )
            .await?;
        Ok((
            response.succeeded,
            response.header.map_or(0, |h| h.revision),
        ))
    }

    /// Grants a lease of `ttl_secs` seconds; returns its id.
    pub async fn grant(&self, ttl_secs: i64) -> Result<i64> {
        let response: LeaseGrantResponse = self
            .unary(
                "/etcdserverpb.Lease/LeaseGrant",
                LeaseGrantRequest {
                    ttl: ttl_secs,
                    id: 0,
                },
            )
            .await?;
        if !response.error.is_empty() {
            return Err(self.unreachable(format!("lease grant: {}", response.error)));
        }
        Ok(response.id)
    }

    /// Revokes a lease (its keys are deleted).
    pub async fn revoke(&self, lease: i64) -> Result<()> {
        let _: LeaseRevokeResponse = self
            .unary(
                "/etcdserverpb.Lease/LeaseRevoke",
                LeaseRevokeRequest { id: lease },
            )
            .await?;
        Ok(())
    }

    /// Renews a lease once over a fresh keep-alive stream; returns the TTL left (0 or
    /// less: the lease has expired and its keys are gone).
    pub async fn keep_alive_once(&self, lease: i64) -> Result<i64> {
        let index = self.current.load(Ordering::Acquire) % self.channels.len();
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut grpc = tonic::client::Grpc::new(self.channels[index].clone());
        let result = async {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let request =
                futures_util::stream::once(async move { LeaseKeepAliveRequest { id: lease } });
            let mut responses = grpc
                .streaming(
                    tonic::Request::new(request),
                    PathAndQuery::from_static("/etcdserverpb.Lease/LeaseKeepAlive"),
                    ProstCodec::<LeaseKeepAliveRequest, LeaseKeepAliveResponse>::default(),
                )
                .await?
                .into_inner();
            match responses.message().await? {
                Some(response) => Ok(response.ttl),
                None => Err(tonic::Status::unavailable("the keep-alive stream ended")),
            }
        }
        .await;
        match result {
            Ok(ttl) => Ok(ttl),
            Err(status) => {
                self.rotate(index);
                Err(self.unreachable(format!(
                    "lease keep-alive on {}: {}",
                    self.endpoints[index],
                    describe(&status)
                )))
            }
        }
    }

    /// Watches every key under `prefix` from `start_revision` on, on the current
    /// endpoint; items go to `sender` until the stream ends (then one `Ended`), or the
    /// receiver is dropped. The caller opens it again from the last revision + 1.
    pub async fn watch_prefix(
        &self,
        prefix: &[u8],
        start_revision: i64,
        sender: tokio::sync::mpsc::Sender<WatchItem>,
    ) {
        let index = self.current.load(Ordering::Acquire) % self.channels.len();
        self.requests.fetch_add(1, Ordering::Relaxed);
        // A watch carries no deadline of its own: it is meant to stay open.
        let mut grpc = tonic::client::Grpc::new(self.channels[index].clone());
        let create = WatchRequest {
            request_union: Some(WatchRequestUnion::Create(WatchCreateRequest {
                key: prefix.to_vec(),
                range_end: prefix_end(prefix),
                start_revision,
                progress_notify: true,
            })),
        };
        // The request stream stays open (a closed request stream would end the watch).
        let requests = futures_util::stream::once(async move { create })
            .chain(futures_util::stream::pending());
        let opened = async {
            grpc.ready()
                .await
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let mut request = tonic::Request::new(requests);
            request.set_timeout(Duration::from_secs(24 * 3600));
            grpc.streaming(
                request,
                PathAndQuery::from_static("/etcdserverpb.Watch/Watch"),
                ProstCodec::<WatchRequest, WatchResponse>::default(),
            )
            .await
        }
        .await;
        let mut stream = match opened {
            Ok(response) => response.into_inner(),
            Err(_) => {
                self.rotate(index);
                let _ = sender.send(WatchItem::Ended { compacted: None }).await;
                return;
            }
        };
        while let Ok(Some(response)) = stream.message().await {
            if response.compact_revision > 0 {
                let _ = sender
                    .send(WatchItem::Ended {
                        compacted: Some(response.compact_revision),
                    })
                    .await;
                return;
            }
            if response.canceled {
                break;
            }
            if !response.events.is_empty()
                && sender
                    .send(WatchItem::Events(response.events))
                    .await
                    .is_err()
            {
                return;
            }
        }
        self.rotate(index);
        let _ = sender.send(WatchItem::Ended { compacted: None }).await;
    }
}

/// Whether another endpoint may succeed where this one failed.
fn retryable(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable | Code::DeadlineExceeded | Code::Unknown | Code::Cancelled
    ) || status.message().contains("leader")
}

fn describe(status: &tonic::Status) -> String {
    format!("{:?}: {}", status.code(), status.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_is_the_first_key_after_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn compare_absent_is_version_equal_zero() {
        let message = Compare::Absent(b"k".to_vec()).message();
        assert_eq!((message.result, message.target), (0, 0));
        assert_eq!(message.target_union, Some(CompareTargetUnion::Version(0)));
    }
}
