//! TLS with rustls (ring's primitives): the certificate files one side of a connection
//! takes, the upstream client's configuration, and the listener's acceptor, whose
//! certificate can be reloaded while connections are open.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpStream;

use crate::conn::Acceptor;
use crate::error::{Error, Result};

/// The certificate files of one side of TLS connections: a CA to trust and a
/// certificate with its key to present. Every TLS connection hotpatch makes or accepts
/// takes these same options (the proxy's upstream and its listener).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// PEM certificates of the authorities to trust. For a client, instead of the
    /// system's roots; for a server, to require and check client certificates.
    pub ca: Option<PathBuf>,
    /// PEM certificate chain to present, leaf first.
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert` (PKCS #8, PKCS #1 or SEC1).
    pub key: Option<PathBuf>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(what: &str, path: &Path, error: impl std::fmt::Display) -> Error {
    Error::Config(format!("{what} {}: {error}", path.display()))
}

fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>> {
    let certificates = CertificateDer::pem_file_iter(path)
        .map_err(|e| tls_error("read certificates from", path, e))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| tls_error("read certificates from", path, e))?;
    if certificates.is_empty() {
        return Err(tls_error(
            "read certificates from",
            path,
            "no PEM certificate in the file",
        ));
    }
    Ok(certificates)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| tls_error("read a private key from", path, e))
}

fn roots(path: &Path) -> Result<RootCertStore> {
    let mut roots = RootCertStore::empty();
    for certificate in read_certificates(path)? {
        roots
            .add(certificate)
            .map_err(|e| tls_error("trust the CA certificate in", path, e))?;
    }
    Ok(roots)
}

impl TlsFiles {
    /// The certificate and key, both or neither.
    fn identity(&self) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Ok(Some((read_certificates(cert)?, read_key(key)?))),
            (None, None) => Ok(None),
            _ => Err(Error::Config(
                "a TLS certificate needs its key and a key its certificate".into(),
            )),
        }
    }

    /// A client configuration: trusts `ca` (else the system's roots) and presents the
    /// certificate when one is given.
    pub fn client_config(&self) -> Result<rustls::ClientConfig> {
        let roots = match &self.ca {
            Some(path) => roots(path)?,
            None => {
                let found = rustls_native_certs::load_native_certs();
                let mut roots = RootCertStore::empty();
                let (added, _) = roots.add_parsable_certificates(found.certs);
                if added == 0 {
                    return Err(Error::Config(format!(
                        "no usable system root certificates ({} errors while loading them); \
                         name a CA file",
                        found.errors.len()
                    )));
                }
                roots
            }
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS client: {e}")))?
            .with_root_certificates(roots);
        match self.identity()? {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| Error::Config(format!("TLS client certificate: {e}"))),
            None => Ok(builder.with_no_client_auth()),
        }
    }

    /// A server configuration: presents the certificate (required) and, when `ca` is
    /// given, requires client certificates it signed.
    pub fn server_config(&self) -> Result<rustls::ServerConfig> {
        let Some((chain, key)) = self.identity()? else {
            return Err(Error::Config(
                "serving TLS needs a certificate and its key".into(),
            ));
        };
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS server: {e}")))?;
        let builder = match &self.ca {
            Some(path) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots(path)?),
                    provider(),
                )
                .build()
                .map_err(|e| tls_error("verify client certificates with", path, e))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| Error::Config(format!("TLS certificate and key: {e}")))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(config)
    }
}

/// The listener's TLS: the files it was started with and the configuration in use, which
/// [`TlsAcceptor::reload`] replaces; a connection keeps the configuration it started with.
#[derive(Clone, Debug)]
pub(crate) struct TlsAcceptor {
    files: TlsFiles,
    config: Arc<ArcSwap<rustls::ServerConfig>>,
}

impl TlsAcceptor {
    pub(crate) fn new(files: TlsFiles) -> Result<TlsAcceptor> {
        let config = files.server_config()?;
        Ok(TlsAcceptor {
            files,
            config: Arc::new(ArcSwap::from_pointee(config)),
        })
    }

    /// Reads the certificate and key files again; on any error the configuration in use
    /// stays.
    pub(crate) fn reload(&self) -> Result<()> {
        let config = self.files.server_config()?;
        self.config.store(Arc::new(config));
        Ok(())
    }
}

impl Acceptor for TlsAcceptor {
    type Stream = tokio_rustls::server::TlsStream<TcpStream>;
    const ENCRYPTED: bool = true;

    async fn accept(&self, stream: TcpStream) -> io::Result<Self::Stream> {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
            .accept(stream)
            .await
    }
}

/// The upstream client's connector: TLS with `files` for an `https://` upstream, plain
/// TCP otherwise (then no certificate is read).
pub(crate) fn upstream_connector(
    mut connector: hyper_util::client::legacy::connect::HttpConnector,
    https: bool,
    files: &TlsFiles,
) -> Result<hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>> {
    let config = if https {
        files.client_config()?
    } else {
        rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| Error::Config(format!("TLS client: {e}")))?
            .with_root_certificates(RootCertStore::empty())
            .with_no_client_auth()
    };
    connector.enforce_http(false);
    let builder = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(config);
    let builder = if https {
        builder.https_only()
    } else {
        builder.https_or_http()
    };
    Ok(builder.enable_http1().wrap_connector(connector))
}
