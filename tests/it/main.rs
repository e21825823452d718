//! The integration-test binary.
mod codecs;
mod gguf_oracle;
mod server;
mod support;
