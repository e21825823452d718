//! The integration-test binary.
mod gguf_oracle;
mod support;
