//! TLS on both sides of the proxy, with certificates the test makes: a client talks HTTPS
//! to the proxy (and gets the new certificate after a reload), and a proxied request
//! reaches an HTTPS upstream that only a named CA vouches for.

use crate::support::{health_upstream, local, runtime};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use server_tier::{Proxy, ProxyConfig, TlsFiles};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA and a certificate it signed for 127.0.0.1, as PEM files in `dir`.
struct Authority {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_authority(dir: &Path, name: &str) -> Authority {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} test CA"));
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let authority = Authority {
        ca: dir.join(format!("{name}-ca.pem")),
        cert: dir.join(format!("{name}-cert.pem")),
        key: dir.join(format!("{name}-key.pem")),
    };
    std::fs::write(&authority.ca, ca.pem()).unwrap();
    std::fs::write(&authority.cert, cert.pem()).unwrap();
    std::fs::write(&authority.key, key.serialize_pem()).unwrap();
    authority
}

/// One `GET path` over TLS to 127.0.0.1:`port`, trusting only the CA in `ca`: the
/// status and body, or the handshake's error.
async fn https_get(port: u16, path: &str, ca: &Path) -> std::io::Result<(u16, String)> {
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for certificate in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(certificate.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let mut stream = connector.connect(name, tcp).await?;
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    // A peer that closes without close_notify ends the read with an error after the data.
    let _ = stream.read_to_end(&mut response).await;
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

fn serving_tls(authority: &Authority) -> TlsFiles {
    TlsFiles {
        ca: None,
        cert: Some(authority.cert.clone()),
        key: Some(authority.key.clone()),
    }
}

#[test]
fn tls_a_client_talks_https_to_the_proxy_and_gets_the_new_certificate_after_a_reload() {
    let dir = tempfile::tempdir().unwrap();
    let first = make_authority(dir.path(), "first");
    let second = make_authority(dir.path(), "second");
    let runtime = runtime();
    let upstream = health_upstream(&runtime);
    let mut config = ProxyConfig::new(format!("http://{upstream}"), local());
    // The files the proxy reads; replaced in place below, as a renewal does.
    let cert = dir.path().join("serve-cert.pem");
    let key = dir.path().join("serve-key.pem");
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    config.tls = Some(TlsFiles {
        ca: None,
        cert: Some(cert.clone()),
        key: Some(key.clone()),
    });
    let proxy = runtime.block_on(Proxy::bind(config)).unwrap();
    assert!(proxy.serves_tls());
    let port = proxy.local_addr().port();
    let (status, body) = runtime
        .block_on(https_get(port, "/health", &first.ca))
        .unwrap();
    assert_eq!((status, body.as_str()), (200, "ok"));
    // A client that trusts another CA refuses the certificate.
    assert!(
        runtime
            .block_on(https_get(port, "/health", &second.ca))
            .is_err()
    );
    // A renewal: new files, a reload, and new connections see the new certificate.
    std::fs::copy(&second.cert, &cert).unwrap();
    std::fs::copy(&second.key, &key).unwrap();
    proxy.reload_tls().unwrap();
    let (status, _) = runtime
        .block_on(https_get(port, "/health", &second.ca))
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        runtime
            .block_on(https_get(port, "/health", &first.ca))
            .is_err()
    );
    // A broken renewal is refused and the certificate in use stays.
    std::fs::write(&key, "not a key").unwrap();
    let error = proxy.reload_tls().unwrap_err();
    assert!(error.to_string().contains("private key"), "{error}");
    assert_eq!(
        runtime
            .block_on(https_get(port, "/health", &second.ca))
            .unwrap()
            .0,
        200
    );
    runtime.block_on(proxy.shutdown()).unwrap();
}

#[test]
fn tls_a_proxied_request_reaches_an_https_upstream_its_ca_vouches_for() {
    let dir = tempfile::tempdir().unwrap();
    let authority = make_authority(dir.path(), "upstream");
    let runtime = runtime();
    let upstream = health_upstream(&runtime);
    // The HTTPS upstream: a TLS-serving proxy in front of the plain one.
    let mut front = ProxyConfig::new(format!("http://{upstream}"), local());
    front.tls = Some(serving_tls(&authority));
    let https_upstream = runtime.block_on(Proxy::bind(front)).unwrap();
    let https_url = format!("https://127.0.0.1:{}", https_upstream.local_addr().port());

    let mut config = ProxyConfig::new(https_url.clone(), local());
    config.upstream_tls.ca = Some(authority.ca.clone());
    let proxy = runtime.block_on(Proxy::bind(config)).unwrap();
    let (status, body) = tests::http_request(proxy.local_addr().port(), "GET", "/health", None)
        .expect("ask the proxy");
    assert_eq!((status, body.as_str()), (200, "ok"));

    // Trusting another CA, the same upstream's certificate is refused: 502.
    let other = make_authority(dir.path(), "other");
    let mut config = ProxyConfig::new(https_url, local());
    config.upstream_tls.ca = Some(other.ca.clone());
    let strict = runtime.block_on(Proxy::bind(config)).unwrap();
    let (status, body) = tests::http_request(strict.local_addr().port(), "GET", "/health", None)
        .expect("ask the proxy");
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("upstream_failure"), "{body}");
    for proxy in [proxy, strict, https_upstream] {
        runtime.block_on(proxy.shutdown()).unwrap();
    }
}
