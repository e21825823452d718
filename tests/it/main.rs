//! The integration-test binary.
mod codecs;
mod gguf_oracle;
mod pipelines;
mod server;
mod support;
