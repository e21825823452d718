//! `cargo xtask bench-proxy`: the latency `hotpatch serve` adds, and cache-hit throughput.
//!
//! 1. Against a small local bench upstream (fixed OpenAI JSON, in this process): the
//!    same request sent directly and through the proxy (rules active: a clamp that
//!    rewrites the request and a redaction that parses the response), interleaved, over
//!    pooled keep-alive connections; the difference of the percentiles is the proxy's
//!    own cost.
//! 2. Against a real llama-server (when `cargo xtask llama-server` and
//!    `cargo xtask real-model` have run): a 1-token `/completion`, direct and proxied.
//! 3. Cache hits: requests per second answered from the cache, against the bench
//!    upstream's own rate, at the same concurrency.
//!
//! Everything listens on 127.0.0.1 and every loop is bounded. A negative "added" figure
//! means the difference is below the run's noise.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use server_tier::{CacheSettings, Proxy, ProxyConfig, RuleSet};

type HttpClient = Client<HttpConnector, Full<Bytes>>;

const LOCAL_ROUNDS: usize = 5_000;
const LLAMA_ROUNDS: usize = 200;
const WARMUP: usize = 200;
const THROUGHPUT_WINDOW: Duration = Duration::from_secs(3);
const CONCURRENCY: usize = 16;

const RULES: &str = r#"
[[rule]]
name = "cool"
action = { type = "clamp", key = "temperature", max = 0.7 }

[[rule]]
name = "keys"
action = { type = "redact", pattern = "sk-[a-z0-9]{16}", regex = true, mask = "*" }
"#;

const CHAT_BODY: &str =
    r#"{"model":"m","messages":[{"role":"user","content":"Say hello."}],"temperature":0.9}"#;

const CHAT_ANSWER: &str = r#"{"id":"chatcmpl-1","object":"chat.completion","created":1,"model":"m","choices":[{"index":0,"message":{"role":"assistant","content":"Hello! How can I help you today?"},"finish_reason":"stop"}],"usage":{"prompt_tokens":9,"completion_tokens":9,"total_tokens":18}}"#;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub fn run() -> Result<()> {
    if crate::rerun_in_release("bench-proxy")? {
        return Ok(());
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(measure())
}

fn client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(64)
        .build(connector)
}

async fn call(
    client: &HttpClient,
    addr: SocketAddr,
    path: &str,
    body: &'static str,
) -> Result<Bytes> {
    let request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(body.as_bytes())))?;
    let response = client.request(request).await?;
    let status = response.status();
    let bytes = response.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "{path} answered {status}: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    Ok(bytes)
}

/// Latencies of `rounds` requests to each address, interleaved so that both see the
/// same machine state.
async fn interleaved(
    client: &HttpClient,
    direct: SocketAddr,
    proxied: SocketAddr,
    path: &str,
    body: &'static str,
    rounds: usize,
) -> Result<(Vec<Duration>, Vec<Duration>)> {
    for _ in 0..WARMUP.min(rounds) {
        call(client, direct, path, body).await?;
        call(client, proxied, path, body).await?;
    }
    let mut a = Vec::with_capacity(rounds);
    let mut b = Vec::with_capacity(rounds);
    for i in 0..rounds {
        // Alternate which goes first, so neither always follows the other.
        let order = if i % 2 == 0 {
            [direct, proxied]
        } else {
            [proxied, direct]
        };
        for addr in order {
            let start = Instant::now();
            call(client, addr, path, body).await?;
            let elapsed = start.elapsed();
            if addr == direct {
                a.push(elapsed);
            } else {
                b.push(elapsed);
            }
        }
    }
    a.sort_unstable();
    b.sort_unstable();
    Ok((a, b))
}

fn report(label: &str, direct: &[Duration], proxied: &[Duration]) {
    let (d50, d99) = (percentile(direct, 0.5), percentile(direct, 0.99));
    let (p50, p99) = (percentile(proxied, 0.5), percentile(proxied, 0.99));
    println!("{label} ({} requests each, interleaved):", direct.len());
    println!("  direct   p50 {:8.3} ms   p99 {:8.3} ms", ms(d50), ms(d99));
    println!("  proxied  p50 {:8.3} ms   p99 {:8.3} ms", ms(p50), ms(p99));
    println!(
        "  added    p50 {:8.3} ms   p99 {:8.3} ms   (goal: 0.35 / 1.0; ratio p50 {:.2}x, p99 {:.2}x)",
        ms(p50) - ms(d50),
        ms(p99) - ms(d99),
        p50.as_secs_f64() / d50.as_secs_f64(),
        p99.as_secs_f64() / d99.as_secs_f64()
    );
}

/// Requests per second over `THROUGHPUT_WINDOW` with `CONCURRENCY` callers.
async fn throughput(client: &HttpClient, addr: SocketAddr, body: &'static str) -> Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + THROUGHPUT_WINDOW;
    let mut tasks = Vec::new();
    for _ in 0..CONCURRENCY {
        let client = client.clone();
        let done = Arc::clone(&done);
        tasks.push(tokio::spawn(async move {
            while Instant::now() < deadline {
                call(&client, addr, "/v1/chat/completions", body).await?;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / THROUGHPUT_WINDOW.as_secs_f64())
}

/// The bench upstream: fixed OpenAI JSON for every chat request.
async fn bench_upstream() -> Result<SocketAddr> {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(|_body: Bytes| async {
            ([("content-type", "application/json")], CHAT_ANSWER)
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(addr)
}

async fn proxy_for(upstream: SocketAddr, rules: &str) -> Result<Proxy> {
    let mut config = ProxyConfig::new(
        format!("http://{upstream}"),
        "127.0.0.1:0".parse().context("address")?,
    );
    config.rules = RuleSet::from_toml_str(rules)?;
    Ok(Proxy::bind(config).await?)
}

/// Times `rounds` requests to `upstream` directly and through a proxy with `rules`,
/// interleaved, prints the comparison under `label`, and returns the proxy.
async fn compare(
    client: &HttpClient,
    upstream: SocketAddr,
    rules: &str,
    (path, body): (&str, &'static str),
    rounds: usize,
    label: &str,
) -> Result<Proxy> {
    let proxy = proxy_for(upstream, rules).await?;
    let (direct, proxied) =
        interleaved(client, upstream, proxy.local_addr(), path, body, rounds).await?;
    report(label, &direct, &proxied);
    Ok(proxy)
}

async fn measure() -> Result<()> {
    let client = client();
    let upstream = bench_upstream().await?;

    let chat = ("/v1/chat/completions", CHAT_BODY);
    compare(
        &client,
        upstream,
        RULES,
        chat,
        LOCAL_ROUNDS,
        "local bench upstream, /v1/chat/completions, 2 rules active (request clamp, response redaction)",
    )
    .await?
    .shutdown()
    .await?;
    let proxy = compare(
        &client,
        upstream,
        "",
        chat,
        LOCAL_ROUNDS,
        "local bench upstream, no rules",
    )
    .await?;

    // Cache hits: a deterministic request, answered from the cache after the first time.
    proxy.control().set_cache(CacheSettings {
        enabled: true,
        ttl_secs: 600,
        max_entries: 1000,
    })?;
    const DETERMINISTIC: &str =
        r#"{"model":"m","messages":[{"role":"user","content":"Say hello."}],"temperature":0}"#;
    call(
        &client,
        proxy.local_addr(),
        "/v1/chat/completions",
        DETERMINISTIC,
    )
    .await?;
    let upstream_before = proxy.control().stats().upstream_requests;
    let cached = throughput(&client, proxy.local_addr(), DETERMINISTIC).await?;
    let upstream_after = proxy.control().stats().upstream_requests;
    let direct_rate = throughput(&client, upstream, DETERMINISTIC).await?;
    println!(
        "cache hits ({CONCURRENCY} concurrent callers, {} s): {cached:.0} requests/s from the cache ({} reached the upstream) against {direct_rate:.0} requests/s from the bench upstream directly ({:.2}x)",
        THROUGHPUT_WINDOW.as_secs(),
        upstream_after - upstream_before,
        cached / direct_rate
    );
    proxy.shutdown().await?;

    llama(&client).await
}

/// The cached llama-server and real model, if both are installed.
fn llama_paths() -> Result<Option<(std::path::PathBuf, std::path::PathBuf)>> {
    let cache = crate::env::cache_dir()?;
    let binary = cache
        .join("llama-server")
        .join("build")
        .join("bin")
        .join("llama-server");
    let model = std::fs::read_to_string(cache.join("real-model.path"))
        .ok()
        .map(|p| std::path::PathBuf::from(p.trim()));
    Ok(match model {
        Some(model) if binary.exists() && model.exists() => Some((binary, model)),
        _ => None,
    })
}

struct LlamaChild(Child);

impl Drop for LlamaChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn llama(client: &HttpClient) -> Result<()> {
    let Some((binary, model)) = llama_paths()? else {
        println!(
            "real llama-server: skipped (run `cargo xtask llama-server` and `cargo xtask real-model` first)"
        );
        return Ok(());
    };
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let child = Command::new(binary)
        .arg("-m")
        .arg(&model)
        .args(["--host", "127.0.0.1", "--port", &port.to_string()])
        .args([
            "--no-repack",
            "-ngl",
            "0",
            "-c",
            "512",
            "-t",
            "2",
            "--no-webui",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start llama-server")?;
    let _child = LlamaChild(child);
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let request =
            http::Request::get(format!("http://{addr}/health")).body(Full::new(Bytes::new()))?;
        if let Ok(response) = client.request(request).await
            && response.status().is_success()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("llama-server did not become healthy in 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    const ONE_TOKEN: &str =
        r#"{"prompt":"Hello","n_predict":1,"temperature":0.9,"seed":1,"cache_prompt":true}"#;
    for (rules, what) in [(RULES, "2 rules active"), ("", "no rules")] {
        compare(
            client,
            addr,
            rules,
            ("/completion", ONE_TOKEN),
            LLAMA_ROUNDS,
            &format!("real llama-server (gemma-3-270m q4_k_m, CPU), 1-token /completion, {what}"),
        )
        .await?
        .shutdown()
        .await?;
    }
    Ok(())
}
