//! The integration-test binary.
mod support;
