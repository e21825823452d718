//! One module per subcommand.

pub mod agent;
pub mod args;
pub mod bytes;
pub mod check;
pub mod demo;
pub mod fleet;
pub mod inspect;
pub mod journal;
pub mod meta;
pub mod patch;
pub mod pipeline;
pub mod plan;
pub mod preset;
pub mod progress;
pub mod serve;
pub mod sets;
pub mod split;
pub mod structure;
pub mod surgery;
pub mod tls;
pub mod view;

/// Whether the error is a write to a closed pipe (`hotpatch inspect | head`), which is
/// not a failure of the command.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    // Only the command's own output: a broken pipe met on a socket (an agent that
    // refused the peer and closed, an upstream that went away) sits inside a typed
    // error and is a failure like any other.
    let broken = Some(std::io::ErrorKind::BrokenPipe);
    error
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind)
        == broken
        || error
            .downcast_ref::<serde_json::Error>()
            .is_some_and(|e| e.io_error_kind() == broken)
}

/// Makes a write past the file-size limit (`ulimit -f`) fail with EFBIG, which byte-tier
/// reports as a typed error naming the limit, instead of killing the process with
/// SIGXFSZ halfway through a journal record. A handler that only sets a flag does this
/// (and, unlike ignoring the signal, is not inherited by programs this one starts).
pub fn report_file_size_limit_as_error() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::AtomicBool;
    signal_hook::flag::register(
        signal_hook::consts::SIGXFSZ,
        Arc::new(AtomicBool::new(false)),
    )
    .map(drop)
    .map_err(|e| anyhow::anyhow!("install a SIGXFSZ handler: {e}"))
}

/// The admin API client of the proxy at `url`, trusting the CA certificates in `ca`
/// besides the system's when given.
pub fn admin_client(
    url: &str,
    token: Option<String>,
    ca: Option<&std::path::Path>,
) -> anyhow::Result<unified_manager::server::AdminClient> {
    Ok(match ca {
        Some(ca) => unified_manager::server::AdminClient::with_ca(url, token, ca)?,
        None => unified_manager::server::AdminClient::new(url, token),
    })
}
