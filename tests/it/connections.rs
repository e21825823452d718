//! Slow and idle clients against `hotpatch serve`'s proxy: half-sent request heads are
//! cut at the header-read timeout, idle kept-alive connections at the idle timeout, and
//! connections past the limit are answered 503 while `/health` keeps answering.

use crate::support::{health_upstream, runtime};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use server_tier::{Proxy, ProxyConfig};

fn start_proxy(runtime: &tokio::runtime::Runtime, change: impl FnOnce(&mut ProxyConfig)) -> Proxy {
    let upstream = health_upstream(runtime);
    let mut config = ProxyConfig::new(format!("http://{upstream}"), "127.0.0.1:0".parse().unwrap());
    change(&mut config);
    runtime.block_on(Proxy::bind(config)).unwrap()
}

/// One `GET /health` on a fresh connection: the status and body.
fn health(port: u16) -> (u16, String) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
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
    (status, body)
}

/// A connection that has sent half a request head.
fn half_open(port: u16) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Ag")
        .unwrap();
    stream
}

/// Waits (at most 60 s) for the server to end the connection; true when it closed it
/// without sending a byte.
fn closed_silently(stream: &mut TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut buffer = [0_u8; 256];
    match stream.read(&mut buffer) {
        Ok(0) => true,
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => true,
        Ok(_) | Err(_) => false,
    }
}

/// Raises this process's soft file limit to its hard limit: the test holds two sockets
/// (client and server side) per half-open request.
fn raise_file_limit(needed: u64) {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
    if soft < needed {
        assert!(
            hard >= needed,
            "the hard file limit {hard} is below the {needed} descriptors this test holds"
        );
        rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard).unwrap();
    }
}

#[test]
fn connections_two_thousand_half_open_requests_are_closed_at_the_header_timeout() {
    const HALF_OPEN: usize = 2000;
    const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
    raise_file_limit(2 * HALF_OPEN as u64 + 256);
    let runtime = runtime();
    let proxy = start_proxy(&runtime, |config| {
        config.limits.header_read_timeout = HEADER_TIMEOUT;
        config.limits.max_connections = 2 * HALF_OPEN;
    });
    let port = proxy.local_addr().port();
    let mut held: Vec<(Instant, TcpStream)> = (0..HALF_OPEN)
        .map(|_| (Instant::now(), half_open(port)))
        .collect();
    // Every half-open request is held, and the proxy still answers.
    let (status, body) = health(port);
    assert_eq!((status, body.as_str()), (200, "ok"));
    for (index, (connected, stream)) in held.iter_mut().enumerate() {
        assert!(
            closed_silently(stream),
            "half-open request {index} was answered or not closed"
        );
        // Not closed before its timeout: it was held, not turned away.
        assert!(
            connected.elapsed() >= HEADER_TIMEOUT,
            "half-open request {index} was closed before the header timeout"
        );
    }
    drop(held);
    assert_eq!(health(port).0, 200);
    runtime.block_on(proxy.shutdown()).unwrap();
}

#[test]
fn connections_past_the_limit_are_answered_503_and_served_again_once_below() {
    let runtime = runtime();
    let proxy = start_proxy(&runtime, |config| {
        config.limits.max_connections = 3;
    });
    let port = proxy.local_addr().port();
    let held: Vec<TcpStream> = (0..3).map(|_| half_open(port)).collect();
    // The three are accepted before the fourth arrives: accept order is connect order.
    let (status, body) = health(port);
    assert_eq!(status, 503, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["status"], 503);
    assert!(
        error["error"]["message"]
            .as_str()
            .unwrap()
            .contains("--max-connections"),
        "{body}"
    );
    drop(held);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = health(port);
        if status == 200 {
            assert_eq!(body, "ok");
            break;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            Instant::now() < deadline,
            "the closed connections were never let go"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    runtime.block_on(proxy.shutdown()).unwrap();
}

#[test]
fn connections_an_idle_kept_alive_connection_is_closed_at_the_idle_timeout() {
    const IDLE_TIMEOUT: Duration = Duration::from_secs(1);
    let runtime = runtime();
    let proxy = start_proxy(&runtime, |config| {
        config.limits.idle_timeout = IDLE_TIMEOUT;
        config.limits.header_read_timeout = Duration::from_secs(600);
    });
    let port = proxy.local_addr().port();
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    // Two requests on one connection: keep-alive works, and each answer restarts the clock.
    for _ in 0..2 {
        stream
            .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            .unwrap();
        let mut response = Vec::new();
        let mut buffer = [0_u8; 1024];
        while !String::from_utf8_lossy(&response).ends_with("\r\n\r\nok") {
            let read = stream.read(&mut buffer).unwrap();
            assert_ne!(read, 0, "closed before the answer");
            response.extend_from_slice(&buffer[..read]);
        }
        assert!(response.starts_with(b"HTTP/1.1 200"));
    }
    let answered = Instant::now();
    // The header timeout is ten minutes and the read gives up after one: only the idle
    // timeout can close it in between.
    assert!(
        closed_silently(&mut stream),
        "the idle connection stayed open"
    );
    assert!(answered.elapsed() >= IDLE_TIMEOUT - Duration::from_millis(50));
    runtime.block_on(proxy.shutdown()).unwrap();
}
