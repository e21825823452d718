//! The `hotpatch` binary, run as a user runs it.

mod crash;
mod edit;
mod full_disk;
mod inspect;
mod manage;
mod serve;
mod tensor;
