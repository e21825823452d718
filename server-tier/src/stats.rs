//! Statistics per hook and per rule, and the Prometheus metrics of the proxy.
//!
//! Everything is a relaxed atomic counter: the hot path pays one atomic add per event.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;

/// Counters of one rule.
#[derive(Debug, Default)]
pub struct RuleStats {
    requests: AtomicU64,
    responses: AtomicU64,
    chunks: AtomicU64,
    bytes_patched: AtomicU64,
    nanos: AtomicU64,
}

/// A snapshot of one rule's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RuleCounts {
    /// Requests it changed or applied to.
    pub requests: u64,
    /// Whole responses it filtered.
    pub responses: u64,
    /// Stream chunks it filtered.
    pub chunks: u64,
    /// Bytes it changed (request keys written, text redacted).
    pub bytes_patched: u64,
    /// Time spent in it, in microseconds.
    pub processing_us: u64,
}

impl RuleStats {
    /// Counters not registered anywhere (for checking a rule without a proxy).
    pub(crate) fn detached() -> Arc<RuleStats> {
        Arc::new(RuleStats::default())
    }

    pub(crate) fn request(&self, bytes: usize, elapsed: Duration) {
        self.requests.fetch_add(1, Relaxed);
        self.add(bytes, elapsed);
    }

    pub(crate) fn response(&self, bytes: usize, elapsed: Duration) {
        self.responses.fetch_add(1, Relaxed);
        self.add(bytes, elapsed);
    }

    pub(crate) fn chunk(&self, bytes: usize, elapsed: Duration) {
        self.chunks.fetch_add(1, Relaxed);
        self.add(bytes, elapsed);
    }

    fn add(&self, bytes: usize, elapsed: Duration) {
        self.bytes_patched.fetch_add(bytes as u64, Relaxed);
        self.nanos
            .fetch_add(elapsed.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    /// The current counts.
    pub fn counts(&self) -> RuleCounts {
        RuleCounts {
            requests: self.requests.load(Relaxed),
            responses: self.responses.load(Relaxed),
            chunks: self.chunks.load(Relaxed),
            bytes_patched: self.bytes_patched.load(Relaxed),
            processing_us: self.nanos.load(Relaxed) / 1000,
        }
    }
}

/// Counters of one hook of the [`crate::ServerPatcher`].
#[derive(Debug, Default)]
pub(crate) struct HookStats {
    calls: AtomicU64,
    nanos: AtomicU64,
}

/// A snapshot of one hook's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HookCounts {
    /// How often it ran.
    pub calls: u64,
    /// Time spent in it, in microseconds.
    pub processing_us: u64,
}

impl HookStats {
    pub(crate) fn record(&self, elapsed: Duration) {
        self.calls.fetch_add(1, Relaxed);
        self.nanos
            .fetch_add(elapsed.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }

    fn counts(&self) -> HookCounts {
        HookCounts {
            calls: self.calls.load(Relaxed),
            processing_us: self.nanos.load(Relaxed) / 1000,
        }
    }
}

/// The route classes requests are counted under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RouteClass {
    ChatCompletions,
    Completions,
    Completion,
    Models,
    Health,
    Other,
    Admin,
    Metrics,
}

impl RouteClass {
    const ALL: [RouteClass; 8] = [
        RouteClass::ChatCompletions,
        RouteClass::Completions,
        RouteClass::Completion,
        RouteClass::Models,
        RouteClass::Health,
        RouteClass::Other,
        RouteClass::Admin,
        RouteClass::Metrics,
    ];

    pub(crate) fn of(path: &str) -> RouteClass {
        match path {
            "/v1/chat/completions" => RouteClass::ChatCompletions,
            "/v1/completions" => RouteClass::Completions,
            "/completion" => RouteClass::Completion,
            "/v1/models" => RouteClass::Models,
            "/health" => RouteClass::Health,
            "/metrics" => RouteClass::Metrics,
            p if p == "/admin" || p.starts_with("/admin/") => RouteClass::Admin,
            _ => RouteClass::Other,
        }
    }

    fn label(self) -> &'static str {
        match self {
            RouteClass::ChatCompletions => "/v1/chat/completions",
            RouteClass::Completions => "/v1/completions",
            RouteClass::Completion => "/completion",
            RouteClass::Models => "/v1/models",
            RouteClass::Health => "/health",
            RouteClass::Other => "other",
            RouteClass::Admin => "/admin",
            RouteClass::Metrics => "/metrics",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Upper bounds of the latency histogram's buckets, in seconds.
const BUCKETS: [f64; 16] = [
    0.0002, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    60.0,
];

#[derive(Debug, Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| seconds <= b) {
            self.buckets[i].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(elapsed.as_nanos().min(u64::MAX as u128) as u64, Relaxed);
    }
}

#[derive(Debug, Default)]
struct RouteMetrics {
    status_2xx: AtomicU64,
    status_3xx: AtomicU64,
    status_4xx: AtomicU64,
    status_5xx: AtomicU64,
    latency: Histogram,
}

/// Every counter of a proxy.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    routes: [RouteMetrics; RouteClass::ALL.len()],
    pub(crate) pre_request: HookStats,
    pub(crate) post_response: HookStats,
    pub(crate) stream_chunk: HookStats,
    pub(crate) upstream_requests: AtomicU64,
    pub(crate) upstream_retries: AtomicU64,
    pub(crate) upstream_errors: AtomicU64,
    pub(crate) upstream_timeouts: AtomicU64,
    pub(crate) cache_hits: AtomicU64,
    pub(crate) cache_misses: AtomicU64,
    pub(crate) cache_bypasses: AtomicU64,
    pub(crate) streams_stopped: AtomicU64,
    pub(crate) client_disconnects: AtomicU64,
    pub(crate) patches_applied: AtomicU64,
    pub(crate) patches_reverted: AtomicU64,
    pub(crate) patches_refused: AtomicU64,
    pub(crate) drains: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    rules: Mutex<BTreeMap<String, Arc<RuleStats>>>,
}

/// A snapshot of the proxy's statistics (the admin API's `GET /admin/stats`).
#[derive(Clone, Debug, Serialize)]
pub struct StatsSnapshot {
    /// Per hook: pre-request, post-response, stream-chunk.
    pub hooks: BTreeMap<&'static str, HookCounts>,
    /// Per rule, by name (rules removed since keep their counts).
    pub rules: BTreeMap<String, RuleCounts>,
    /// Requests sent to the upstream server (a retry on a fresh connection is not
    /// counted again).
    pub upstream_requests: u64,
    /// Requests sent again because a pooled connection was found closed.
    pub upstream_retries: u64,
    /// Upstream exchanges that failed (502).
    pub upstream_errors: u64,
    /// Upstream exchanges that timed out (504 or a stream cut for idleness).
    pub upstream_timeouts: u64,
    /// Answers from the cache.
    pub cache_hits: u64,
    /// Cacheable requests not found in the cache.
    pub cache_misses: u64,
    /// Cacheable requests that asked to bypass it.
    pub cache_bypasses: u64,
    /// Streams ended early by a `stop_stream` rule.
    pub streams_stopped: u64,
    /// Streams the client left before their end.
    pub client_disconnects: u64,
    /// Live patches applied through the admin API.
    pub patches_applied: u64,
    /// Live patches reverted (by request or by expiry).
    pub patches_reverted: u64,
    /// Live patches refused (a lock, a conflict, a failed check).
    pub patches_refused: u64,
    /// Drain-and-patch operations.
    pub drains: u64,
    /// Proxied requests in flight now.
    pub in_flight: u64,
}

impl Stats {
    /// The counters of the rule named `name`, created on first use.
    pub(crate) fn rule(&self, name: &str) -> Arc<RuleStats> {
        let mut rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(rules.entry(name.to_owned()).or_default())
    }

    pub(crate) fn observe(&self, route: RouteClass, status: u16, elapsed: Duration) {
        let metrics = &self.routes[route.index()];
        let counter = match status {
            200..=299 => &metrics.status_2xx,
            300..=399 => &metrics.status_3xx,
            400..=499 => &metrics.status_4xx,
            _ => &metrics.status_5xx,
        };
        counter.fetch_add(1, Relaxed);
        metrics.latency.observe(elapsed);
    }

    pub(crate) fn snapshot(&self) -> StatsSnapshot {
        let rules = self.rules.lock().unwrap_or_else(|p| p.into_inner());
        StatsSnapshot {
            hooks: BTreeMap::from([
                ("pre_request", self.pre_request.counts()),
                ("post_response", self.post_response.counts()),
                ("stream_chunk", self.stream_chunk.counts()),
            ]),
            rules: rules.iter().map(|(k, v)| (k.clone(), v.counts())).collect(),
            upstream_requests: self.upstream_requests.load(Relaxed),
            upstream_retries: self.upstream_retries.load(Relaxed),
            upstream_errors: self.upstream_errors.load(Relaxed),
            upstream_timeouts: self.upstream_timeouts.load(Relaxed),
            cache_hits: self.cache_hits.load(Relaxed),
            cache_misses: self.cache_misses.load(Relaxed),
            cache_bypasses: self.cache_bypasses.load(Relaxed),
            streams_stopped: self.streams_stopped.load(Relaxed),
            client_disconnects: self.client_disconnects.load(Relaxed),
            patches_applied: self.patches_applied.load(Relaxed),
            patches_reverted: self.patches_reverted.load(Relaxed),
            patches_refused: self.patches_refused.load(Relaxed),
            drains: self.drains.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub(crate) fn prometheus(&self, epoch: u64, cache_entries: u64) -> String {
        let mut out = String::with_capacity(8192);
        let snapshot = self.snapshot();
        out.push_str("# HELP hotpatch_requests_total Requests answered, by route class and status class.\n# TYPE hotpatch_requests_total counter\n");
        for route in RouteClass::ALL {
            let m = &self.routes[route.index()];
            for (class, counter) in [
                ("2xx", &m.status_2xx),
                ("3xx", &m.status_3xx),
                ("4xx", &m.status_4xx),
                ("5xx", &m.status_5xx),
            ] {
                let _ = writeln!(
                    out,
                    "hotpatch_requests_total{{route=\"{}\",status=\"{class}\"}} {}",
                    route.label(),
                    counter.load(Relaxed)
                );
            }
        }
        out.push_str("# HELP hotpatch_request_duration_seconds Time to the response head, by route class.\n# TYPE hotpatch_request_duration_seconds histogram\n");
        for route in RouteClass::ALL {
            let h = &self.routes[route.index()].latency;
            let mut cumulative = 0;
            for (bound, bucket) in BUCKETS.iter().zip(&h.buckets) {
                cumulative += bucket.load(Relaxed);
                let _ = writeln!(
                    out,
                    "hotpatch_request_duration_seconds_bucket{{route=\"{}\",le=\"{bound}\"}} {cumulative}",
                    route.label()
                );
            }
            let count = h.count.load(Relaxed);
            let _ = writeln!(
                out,
                "hotpatch_request_duration_seconds_bucket{{route=\"{0}\",le=\"+Inf\"}} {count}\nhotpatch_request_duration_seconds_sum{{route=\"{0}\"}} {1}\nhotpatch_request_duration_seconds_count{{route=\"{0}\"}} {count}",
                route.label(),
                h.sum_nanos.load(Relaxed) as f64 / 1e9
            );
        }
        let counters: [(&str, &str, u64); 14] = [
            (
                "hotpatch_upstream_requests_total",
                "Requests sent to the upstream server.",
                snapshot.upstream_requests,
            ),
            (
                "hotpatch_upstream_errors_total",
                "Upstream exchanges that failed.",
                snapshot.upstream_errors,
            ),
            (
                "hotpatch_upstream_timeouts_total",
                "Upstream exchanges that timed out.",
                snapshot.upstream_timeouts,
            ),
            (
                "hotpatch_cache_hits_total",
                "Responses served from the cache.",
                snapshot.cache_hits,
            ),
            (
                "hotpatch_cache_misses_total",
                "Cacheable requests not in the cache.",
                snapshot.cache_misses,
            ),
            (
                "hotpatch_cache_bypasses_total",
                "Cacheable requests that bypassed the cache.",
                snapshot.cache_bypasses,
            ),
            (
                "hotpatch_streams_stopped_total",
                "Streams ended early by a rule.",
                snapshot.streams_stopped,
            ),
            (
                "hotpatch_client_disconnects_total",
                "Streams the client left before their end.",
                snapshot.client_disconnects,
            ),
            (
                "hotpatch_patches_applied_total",
                "Live patches applied.",
                snapshot.patches_applied,
            ),
            (
                "hotpatch_patches_reverted_total",
                "Live patches reverted.",
                snapshot.patches_reverted,
            ),
            (
                "hotpatch_patches_refused_total",
                "Live patches refused.",
                snapshot.patches_refused,
            ),
            (
                "hotpatch_drains_total",
                "Drain-and-patch operations.",
                snapshot.drains,
            ),
            (
                "hotpatch_hook_calls_total",
                "Calls of the pre-request hook.",
                snapshot.hooks["pre_request"].calls,
            ),
            (
                "hotpatch_stream_chunk_hook_calls_total",
                "Calls of the stream-chunk hook.",
                snapshot.hooks["stream_chunk"].calls,
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let gauges: [(&str, &str, u64); 3] = [
            (
                "hotpatch_in_flight_requests",
                "Proxied requests in flight.",
                snapshot.in_flight,
            ),
            (
                "hotpatch_patch_epoch",
                "Patch state of the model; every live patch and revert advances it.",
                epoch,
            ),
            (
                "hotpatch_cache_entries",
                "Entries in the response cache.",
                cache_entries,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        out.push_str("# HELP hotpatch_rule_bytes_patched_total Bytes changed by each rule.\n# TYPE hotpatch_rule_bytes_patched_total counter\n");
        for (name, counts) in &snapshot.rules {
            let _ = writeln!(
                out,
                "hotpatch_rule_bytes_patched_total{{rule=\"{}\"}} {}",
                escape_label(name),
                counts.bytes_patched
            );
        }
        out
    }
}

fn escape_label(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}
