//! The integration-test binary.
mod codecs;
mod support;
