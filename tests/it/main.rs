//! The integration-test binary.
mod codecs;
mod connections;
mod gguf_oracle;
mod hostile;
mod pipelines;
mod server;
mod support;
mod tls;
