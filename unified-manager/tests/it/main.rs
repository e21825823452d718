//! The `hotpatch` binary, run as a user runs it.

mod crash;
mod edit;
mod inspect;
mod manage;
mod serve;
mod shards;
mod tensor;
