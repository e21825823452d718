//! `hotpatch serve`: the OpenAI-compatible proxy with rules, cache and the live-patch
//! admin API. Glue only: builds a `server_tier::ProxyConfig` and runs the proxy until
//! SIGINT or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use server_tier::{AdminAccess, Limits, Proxy, ProxyConfig, RuleSet};

/// Arguments of `hotpatch serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The upstream server's base URL (llama-server or any OpenAI-compatible server).
    #[arg(long, value_name = "URL")]
    pub upstream: String,
    /// Address to listen on.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// The GGUF file the upstream llama-server maps, for live patches through the admin
    /// API (run llama-server on CPU with --no-repack, and with --slot-save-path DIR so
    /// that its prompt caches can be erased after each patch). A shard of a set stands
    /// for the whole set (give the first, which llama-server loads): each patch goes to
    /// the shard that holds its tensor.
    #[arg(long, value_name = "FILE")]
    pub model: Option<PathBuf>,
    /// Patch --model without checking that it is the file the upstream serves (its
    /// `GET /props` model_path); every patch reply then says it was not verified.
    #[arg(long, requires = "model")]
    pub model_unverified: bool,
    /// The agent socket of the upstream llama-server started with `hotpatch launch`:
    /// live patches then reach every weight it holds (repacked, on a GPU, remote), not
    /// only those it reads from the file mapping. Needs --model.
    #[arg(long, value_name = "SOCKET", requires = "model")]
    pub agent: Option<PathBuf>,
    /// A TOML rules file (`[[rule]]` tables and an optional `[cache]` table).
    #[arg(long, value_name = "FILE")]
    pub rules: Option<PathBuf>,
    /// A file holding the admin API's bearer token; without it the admin API is off.
    #[arg(long, value_name = "FILE", conflicts_with = "admin_insecure_loopback")]
    pub admin_token_file: Option<PathBuf>,
    /// Serve the admin API without a token (only on a loopback listen address).
    #[arg(long)]
    pub admin_insecure_loopback: bool,
    /// Let the admin API take its bearer token over plain HTTP on a non-loopback listen
    /// address (refused by default: anyone on the network path could read the token).
    #[arg(long)]
    pub admin_allow_plaintext: bool,
    #[command(flatten)]
    pub tls: super::tls::ServeTlsArgs,
    /// Largest request body accepted, in bytes.
    #[arg(long, value_name = "BYTES", default_value_t = Limits::default().body_limit)]
    pub body_limit: usize,
    /// Seconds to wait for the upstream's response head.
    #[arg(long, value_name = "SECS", default_value_t = Limits::default().upstream_timeout.as_secs())]
    pub upstream_timeout_secs: u64,
    /// Seconds a drain-and-patch waits for in-flight requests.
    #[arg(long, value_name = "SECS", default_value_t = Limits::default().drain_timeout.as_secs())]
    pub drain_timeout_secs: u64,
    /// Seconds a client may take to send a whole request head (from connecting, or from
    /// the previous response on a kept-alive connection) before it is disconnected.
    #[arg(long, value_name = "SECS", default_value_t = Limits::default().header_read_timeout.as_secs())]
    pub header_read_timeout_secs: u64,
    /// Seconds a kept-alive connection may sit with no request before it is closed.
    #[arg(long, value_name = "SECS", default_value_t = Limits::default().idle_timeout.as_secs())]
    pub idle_timeout_secs: u64,
    #[command(flatten)]
    pub fleet: Box<super::fleet::FleetMemberArgs>,
    /// Most client connections open at once; past it a new one is answered 503.
    #[arg(long, value_name = "N", default_value_t = Limits::default().max_connections)]
    pub max_connections: usize,
}

impl ServeArgs {
    /// The proxy configuration these arguments describe.
    pub fn config(&self) -> anyhow::Result<ProxyConfig> {
        let mut config = ProxyConfig::new(self.upstream.clone(), self.listen);
        config.model = self.model.clone();
        config.verify_model = !self.model_unverified;
        config.agent = self.agent.clone();
        config.upstream_tls = self.tls.upstream();
        config.tls = self.tls.listen();
        config.admin_allow_plaintext = self.admin_allow_plaintext;
        if let Some(path) = &self.rules {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            config.rules = RuleSet::from_toml_str(&text)
                .with_context(|| format!("rules file {}", path.display()))?;
        }
        config.admin = match (&self.admin_token_file, self.admin_insecure_loopback) {
            (Some(path), _) => {
                let token = std::fs::read_to_string(path)
                    .with_context(|| format!("read the admin token from {}", path.display()))?;
                if token.trim().is_empty() {
                    bail!("the admin token file {} is empty", path.display());
                }
                AdminAccess::Token(token.trim().to_owned())
            }
            (None, true) => AdminAccess::InsecureLoopback,
            (None, false) => AdminAccess::Disabled,
        };
        config.limits.body_limit = self.body_limit;
        config.limits.upstream_timeout = Duration::from_secs(self.upstream_timeout_secs);
        config.limits.drain_timeout = Duration::from_secs(self.drain_timeout_secs);
        config.limits.header_read_timeout = Duration::from_secs(self.header_read_timeout_secs);
        config.limits.idle_timeout = Duration::from_secs(self.idle_timeout_secs);
        config.limits.max_connections = self.max_connections;
        if self.fleet.fleet.is_some() {
            config.hold_generation = Some(unified_manager::fleet::member::CONVERGING.into());
        }
        Ok(config)
    }
}

/// Runs the proxy until SIGINT or SIGTERM.
pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let config = args.config()?;
    let admin = match &config.admin {
        AdminAccess::Disabled => "off (no --admin-token-file)",
        AdminAccess::Token(_) => "on, bearer token",
        AdminAccess::InsecureLoopback => "on, no token (loopback only)",
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the async runtime")?;
    runtime.block_on(async {
        let upstream = config.upstream.clone();
        let proxy = Proxy::bind(config).await.context("start the proxy")?;
        let scheme = if proxy.serves_tls() { "https" } else { "http" };
        println!(
            "hotpatch serve: listening on {scheme}://{} -> {upstream}; admin API {admin}",
            proxy.local_addr()
        );
        let member = args.fleet.fleet.as_ref().map(|fleet| {
            let options = unified_manager::fleet::MemberOptions {
                fleet: fleet.clone(),
                replica: args
                    .fleet
                    .replica
                    .clone()
                    .unwrap_or_else(|| format!("replica-{}", proxy.local_addr().port())),
                endpoints: args.fleet.etcd.clone(),
                tls: args.fleet.tls.tls(),
                upstream: upstream.clone(),
                listen: proxy.local_addr().to_string(),
                lease_ttl_secs: args.fleet.fleet_lease_ttl_secs.max(2),
            };
            println!(
                "hotpatch serve: fleet {fleet} member {} on etcd {}",
                options.replica,
                options.endpoints.join(",")
            );
            tokio::spawn(unified_manager::fleet::run_member(options, proxy.control()))
        });
        let result = match member {
            None => wait_for_signal(&proxy).await,
            Some(mut member) => tokio::select! {
                result = wait_for_signal(&proxy) => result,
                joined = &mut member => match joined {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(error)) => Err(anyhow::Error::new(error).context("fleet member")),
                    Err(join) => Err(anyhow::anyhow!("fleet member task: {join}")),
                },
            },
        };
        result?;
        proxy.shutdown().await.context("shut the proxy down")
    })
}

/// Waits for SIGINT or SIGTERM; on SIGHUP reloads the TLS certificate and key.
async fn wait_for_signal(proxy: &Proxy) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).context("listen for SIGTERM")?;
    let mut hangup = signal(SignalKind::hangup()).context("listen for SIGHUP")?;
    loop {
        tokio::select! {
            result = tokio::signal::ctrl_c() => return result.context("listen for SIGINT"),
            _ = terminate.recv() => return Ok(()),
            _ = hangup.recv() => match proxy.reload_tls() {
                Ok(()) if proxy.serves_tls() => {
                    println!("hotpatch serve: reloaded the TLS certificate and key");
                }
                Ok(()) => {}
                Err(error) => eprintln!(
                    "hotpatch serve: kept the TLS certificate in use: {}",
                    error.chain()
                ),
            },
        }
    }
}
