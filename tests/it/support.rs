//! The shared test support, under the name the test modules use.

#[allow(unused_imports)]
pub use tests::{cache_dir, oracle_python, real_model, run_python};

/// A tokio runtime for the proxy tests: two workers, I/O and timers on.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `127.0.0.1:0`: a free loopback port for a proxy to listen on.
pub fn local() -> std::net::SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

/// A plain upstream on loopback that answers `/health` with "ok"; its address.
pub fn health_upstream(runtime: &tokio::runtime::Runtime) -> std::net::SocketAddr {
    let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    runtime.spawn(async move { axum::serve(listener, app).await });
    addr
}
