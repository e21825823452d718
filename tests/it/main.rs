//! The integration-test binary.
mod codecs;
mod gguf_oracle;
mod hostile;
mod pipelines;
mod server;
mod support;
