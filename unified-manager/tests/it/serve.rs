//! `hotpatch serve` as a user starts it: bad configurations fail with a clear message,
//! and a running proxy answers, enforces its admin token and stops on SIGTERM.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");

fn failure(args: &[&str]) -> String {
    let output = Command::new(HOTPATCH).args(args).output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(1),
        "hotpatch {args:?} did not fail"
    );
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn serve_refuses_bad_configurations() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[[rule]]\nname = \"a\"\ncolour = \"red\"\naction = { type = \"set\", key = \"k\", value = 1 }\n",
    )
    .unwrap();
    let message = failure(&[
        "serve",
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        "127.0.0.1:0",
        "--rules",
        rules.to_str().unwrap(),
    ]);
    assert!(message.contains("colour"), "{message}");
    let message = failure(&[
        "serve",
        "--upstream",
        "http://127.0.0.1:9",
        "--listen",
        "0.0.0.0:0",
        "--admin-insecure-loopback",
    ]);
    assert!(message.contains("loopback"), "{message}");
    let message = failure(&["serve", "--upstream", "ftp://x", "--listen", "127.0.0.1:0"]);
    assert!(message.contains("http://"), "{message}");
}

#[test]
fn serve_answers_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let port = tests::free_port();
    let dead = tests::free_port();
    let mut child = Command::new(HOTPATCH)
        .args(["serve", "--upstream", &format!("http://127.0.0.1:{dead}")])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--admin-token-file")
        .arg(&token)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let (status, body) = loop {
        if let Ok(reply) = tests::http_request(port, "GET", "/health", None) {
            break reply;
        }
        assert!(Instant::now() < deadline, "the proxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    };
    // The upstream is down: a JSON 502, and the proxy goes on serving.
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("upstream_failure"), "{body}");
    let (status, _) = tests::http_request(port, "GET", "/admin/rules", None).unwrap();
    assert_eq!(status, 401);
    let (status, body) = tests::http_request(port, "GET", "/metrics", None).unwrap();
    assert_eq!(status, 200);
    assert!(body.contains("hotpatch_upstream_errors_total 1"), "{body}");

    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let exit = child.wait().unwrap();
    assert!(exit.success(), "hotpatch serve exited with {exit}");
}

#[test]
fn serve_help_shows_the_connection_limits_and_the_tls_flags() {
    let output = Command::new(HOTPATCH)
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--header-read-timeout-secs <SECS>",
        "--idle-timeout-secs <SECS>",
        "--max-connections <N>",
        "--tls-cert <FILE>",
        "--tls-key <FILE>",
        "--upstream-ca <FILE>",
        "--admin-allow-plaintext",
    ] {
        assert!(help.contains(flag), "{flag} is not in:\n{help}");
    }
    assert!(help.contains("[default: 30]"), "{help}");
}

#[test]
fn patch_and_revert_reach_a_proxy_that_serves_https_through_its_ca() {
    // `hotpatch serve --tls-cert` holds the model; `patch --server https://…` needs the
    // CA that signed the proxy's certificate (`--admin-ca`), and then patches and reverts
    // the file through the admin API over TLS.
    let dir = tempfile::tempdir().unwrap();
    let pki = crate::fleet_tls::make_pki(dir.path());
    let model = unified_manager::demo::write_demo_model(
        dir.path(),
        unified_manager::demo::DemoShape::default(),
    )
    .unwrap();
    let original = std::fs::read(&model).unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "s3cret\n").unwrap();
    let port = tests::free_port();
    let dead = tests::free_port();
    let child = Command::new(HOTPATCH)
        .args(["serve", "--upstream", &format!("http://127.0.0.1:{dead}")])
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .arg("--model")
        .arg(&model)
        .arg("--model-unverified")
        .arg("--admin-token-file")
        .arg(&token)
        .arg("--tls-cert")
        .arg(&pki.server_cert)
        .arg("--tls-key")
        .arg(&pki.server_key)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Stop(std::process::Child);
    impl Drop for Stop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _serve = Stop(child);
    let deadline = Instant::now() + Duration::from_secs(60);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the proxy did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("https://127.0.0.1:{port}");
    let hotpatch = |extra: &[&std::ffi::OsStr]| {
        let mut command = Command::new(HOTPATCH);
        command.args(extra);
        command.args(["--server", &url, "--admin-token-file"]);
        command.arg(&token);
        command.output().unwrap()
    };
    let os = |s: &'static str| std::ffi::OsStr::new(s);
    let patch = [
        os("patch"),
        model.as_os_str(),
        os("--tensor"),
        os("output_norm.weight"),
        os("--scale"),
        os("0.5"),
    ];

    // Without the CA, the proxy's certificate is not trusted: refused, nothing written.
    let out = hotpatch(&patch);
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(!out.status.success(), "an unknown CA was trusted");
    assert!(stderr.contains("certificate"), "{stderr}");
    assert_eq!(std::fs::read(&model).unwrap(), original);

    // With it, the patch lands in the file, and a revert takes it back out.
    let with_ca = |args: &[&std::ffi::OsStr]| {
        let mut all = args.to_vec();
        all.extend([os("--admin-ca"), pki.ca.as_os_str()]);
        let out = hotpatch(&all);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    with_ca(&patch);
    assert_ne!(std::fs::read(&model).unwrap(), original);
    with_ca(&[os("revert"), model.as_os_str(), os("--last")]);
    assert_eq!(std::fs::read(&model).unwrap(), original);
}
