//! The admin API's refusal of plaintext bearer tokens on non-loopback addresses: the
//! decision per connection, and the answer a refused connection gives.

use std::net::IpAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{AdminPolicy, PLAINTEXT_ADMIN_REFUSED, serve_http};
use crate::Limits;

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

#[test]
fn a_bearer_token_over_plain_http_is_refused_only_off_loopback() {
    let token = AdminPolicy {
        token: true,
        allow_plaintext: false,
    };
    for public in ["192.0.2.7", "10.1.2.3", "0.0.0.0", "2001:db8::1"] {
        assert!(token.refuses(false, ip(public)), "{public}");
        assert!(!token.refuses(true, ip(public)), "{public} over TLS");
    }
    for loopback in ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"] {
        assert!(!token.refuses(false, ip(loopback)), "{loopback}");
    }
    let allowed = AdminPolicy {
        allow_plaintext: true,
        ..token
    };
    assert!(!allowed.refuses(false, ip("192.0.2.7")));
    let no_token = AdminPolicy {
        token: false,
        allow_plaintext: false,
    };
    assert!(!no_token.refuses(false, ip("192.0.2.7")));
}

/// One request over a connection served with `refuse_admin`: the status and body.
async fn exchange(refuse_admin: bool, path: &str) -> (u16, String) {
    let router = axum::Router::new()
        .route("/admin/rules", axum::routing::get(|| async { "rules" }))
        .route("/health", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_stop_sender, stop) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        serve_http(
            stream,
            router,
            Limits::default(),
            Duration::from_secs(30),
            refuse_admin,
            stop,
        )
        .await;
    });
    let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
    client
        .write_all(
            format!(
                "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer secret\r\n\
                 Connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    client.read_to_string(&mut response).await.unwrap();
    server.await.unwrap();
    let status = response.split(' ').nth(1).unwrap().parse().unwrap();
    let body = response.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

#[tokio::test]
async fn a_refused_connection_answers_admin_requests_403_with_the_reason() {
    let (status, body) = exchange(true, "/admin/rules").await;
    assert_eq!(status, 403, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(error["error"]["code"], "plaintext_admin_refused");
    assert_eq!(error["error"]["message"], PLAINTEXT_ADMIN_REFUSED);
    assert!(PLAINTEXT_ADMIN_REFUSED.contains("--admin-allow-plaintext"));
    // Everything else on the connection is served, and so is admin when allowed.
    assert_eq!(exchange(true, "/health").await, (200, "ok".to_owned()));
    assert_eq!(
        exchange(false, "/admin/rules").await,
        (200, "rules".to_owned())
    );
}
