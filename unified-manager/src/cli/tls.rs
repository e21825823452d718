//! TLS flags: each group maps to one `server_tier::TlsFiles` (a CA to trust, a certificate
//! and key to present), the options every TLS connection of hotpatch takes.

use std::path::PathBuf;

use server_tier::TlsFiles;

/// TLS of `hotpatch serve`: to an `https://` upstream and on the listening side.
#[derive(Debug, clap::Args)]
pub struct ServeTlsArgs {
    /// PEM file of the CA certificates that sign an https:// upstream's certificate
    /// (instead of the system's roots).
    #[arg(long, value_name = "FILE")]
    pub upstream_ca: Option<PathBuf>,
    /// PEM client certificate to present to an https:// upstream.
    #[arg(long, value_name = "FILE", requires = "upstream_key")]
    pub upstream_cert: Option<PathBuf>,
    /// PEM private key of --upstream-cert.
    #[arg(long, value_name = "FILE", requires = "upstream_cert")]
    pub upstream_key: Option<PathBuf>,
    /// Serve HTTPS with this PEM certificate chain (reloaded on SIGHUP).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert (reloaded on SIGHUP).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Require client certificates signed by the CAs in this PEM file (with --tls-cert).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServeTlsArgs {
    /// The upstream side's files.
    pub fn upstream(&self) -> TlsFiles {
        TlsFiles {
            ca: self.upstream_ca.clone(),
            cert: self.upstream_cert.clone(),
            key: self.upstream_key.clone(),
        }
    }

    /// The listening side's files, when it serves TLS.
    pub fn listen(&self) -> Option<TlsFiles> {
        self.tls_cert.as_ref().map(|cert| TlsFiles {
            ca: self.tls_client_ca.clone(),
            cert: Some(cert.clone()),
            key: self.tls_key.clone(),
        })
    }
}
