//! The integration-test binary.
mod support;
mod gguf_oracle;
