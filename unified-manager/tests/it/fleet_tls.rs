//! A fleet on an etcd that speaks only TLS and checks its clients' certificates
//! (`--client-cert-auth`), with a CA and certificates the test makes: a sidecar joins it
//! and a rollout reaches the sidecar's model, all over TLS; a client without its
//! certificate, one that does not know the CA, and TLS options given for a plain
//! `http://` endpoint each get a clear error.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use unified_manager::demo::{DemoShape, write_demo_model};

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");
const FLEET: &str = "secure";

/// The preset the rollout applies: the final norm halved.
const HALVE_NORM: &str = r#"
name = "halve-norm"
version = 1

[[memory_patch]]
name = "halve-output-norm"
tensor = "output_norm.weight"
transform = { scale = 0.5 }
"#;

/// PEM files: a CA, a server certificate it signed for 127.0.0.1, and a client
/// certificate it signed.
pub(crate) struct Pki {
    pub(crate) ca: PathBuf,
    pub(crate) server_cert: PathBuf,
    pub(crate) server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

pub(crate) fn make_pki(dir: &Path) -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "fleet test CA");
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();

    let server_key = rcgen::KeyPair::generate().unwrap();
    let mut server_params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .unwrap();
    server_params.extended_key_usages = vec![
        rcgen::ExtendedKeyUsagePurpose::ServerAuth,
        rcgen::ExtendedKeyUsagePurpose::ClientAuth,
    ];
    let server = server_params.signed_by(&server_key, &ca).unwrap();

    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut client_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    client_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "hotpatch");
    client_params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client = client_params.signed_by(&client_key, &ca).unwrap();

    let pki = Pki {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server-key.pem"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client-key.pem"),
    };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.server_cert, server.pem()).unwrap();
    std::fs::write(&pki.server_key, server_key.serialize_pem()).unwrap();
    std::fs::write(&pki.client_cert, client.pem()).unwrap();
    std::fs::write(&pki.client_key, client_key.serialize_pem()).unwrap();
    pki
}

/// A child process SIGKILLed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One etcd member whose client URL is TLS only and checks client certificates.
fn start_tls_etcd(dir: &Path, pki: &Pki) -> (Killed, String) {
    let client = format!("https://127.0.0.1:{}", tests::free_port());
    let peer = format!("http://127.0.0.1:{}", tests::free_port());
    let log = std::fs::File::create(dir.join("etcd.log")).unwrap();
    let child = Command::new(tests::etcd_binary())
        .args(["--name", "m0"])
        .arg("--data-dir")
        .arg(dir.join("etcd.data"))
        .args(["--listen-client-urls", &client])
        .args(["--advertise-client-urls", &client])
        .args(["--listen-peer-urls", &peer])
        .args(["--initial-advertise-peer-urls", &peer])
        .args(["--initial-cluster", &format!("m0={peer}")])
        .arg("--cert-file")
        .arg(&pki.server_cert)
        .arg("--key-file")
        .arg(&pki.server_key)
        .arg("--trusted-ca-file")
        .arg(&pki.ca)
        .arg("--client-cert-auth")
        .args(["--logger", "zap", "--log-level", "error"])
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start etcd");
    (Killed(child), client)
}

fn tls_args(pki: &Pki) -> Vec<String> {
    [
        ("--etcd-ca", &pki.ca),
        ("--etcd-cert", &pki.client_cert),
        ("--etcd-key", &pki.client_key),
    ]
    .into_iter()
    .flat_map(|(flag, path)| [flag.to_owned(), path.to_string_lossy().into_owned()])
    .collect()
}

fn fleet(args: &[&str], extra: &[String]) -> Output {
    Command::new(HOTPATCH)
        .arg("fleet")
        .args(args)
        .args(extra)
        .output()
        .unwrap()
}

/// Waits for `ready`, polling; panics with `what` after 60 s.
fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_fleet_runs_over_tls_on_an_etcd_that_checks_client_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let pki = make_pki(dir.path());
    let (_etcd, endpoint) = start_tls_etcd(dir.path(), &pki);
    let tls = tls_args(&pki);

    // The cluster answers a client with the CA and a certificate.
    wait_until("etcd to answer over TLS", || {
        fleet(&["members", FLEET, "--etcd", &endpoint, "--json"], &tls)
            .status
            .success()
    });

    // Without a client certificate the cluster refuses the handshake.
    let ca_only = vec![
        "--etcd-ca".to_owned(),
        pki.ca.to_string_lossy().into_owned(),
    ];
    let out = fleet(&["members", FLEET, "--etcd", &endpoint], &ca_only);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("etcd at"), "{said}");

    // Without the CA the client does not trust the cluster (the system roots do not
    // vouch for a test CA).
    let cert_only: Vec<String> = tls[2..].to_vec();
    let out = fleet(&["members", FLEET, "--etcd", &endpoint], &cert_only);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("etcd at"));

    // TLS options for a plain endpoint are refused, not ignored.
    let plain = endpoint.replace("https://", "http://");
    let out = fleet(&["members", FLEET, "--etcd", &plain], &tls);
    assert_eq!(out.status.code(), Some(1));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("plain http://"), "{said}");

    // A sidecar joins over TLS, and a rollout over TLS reaches its model.
    let model = write_demo_model(dir.path(), DemoShape::default()).unwrap();
    let before = std::fs::read(&model).unwrap();
    let port = tests::free_port();
    let _sidecar = Killed(
        Command::new(HOTPATCH)
            .args([
                "serve",
                "--upstream",
                &format!("http://127.0.0.1:{}", tests::free_port()),
                "--model-unverified",
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .arg("--model")
            .arg(&model)
            .args(["--fleet", FLEET, "--etcd", &endpoint, "--replica", "r0"])
            .args(&tls)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_until("the sidecar to register over TLS", || {
        let out = fleet(&["members", FLEET, "--etcd", &endpoint, "--json"], &tls);
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("\"r0\"")
    });

    let preset = dir.path().join("halve.toml");
    std::fs::write(&preset, HALVE_NORM).unwrap();
    let out = fleet(
        &[
            "apply",
            FLEET,
            preset.to_str().unwrap(),
            "--etcd",
            &endpoint,
            "--apply-timeout-secs",
            "30",
        ],
        &tls,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_ne!(std::fs::read(&model).unwrap(), before);

    let out = fleet(&["revert", FLEET, "--etcd", &endpoint], &tls);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&model).unwrap(), before);
}
