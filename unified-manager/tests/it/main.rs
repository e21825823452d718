//! The `hotpatch` binary, run as a user runs it.

mod crash;
mod edit;
mod inspect;
mod serve;
mod tensor;
