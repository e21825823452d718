//! The integration-test binary.
mod codecs;
mod gguf_oracle;
mod support;
