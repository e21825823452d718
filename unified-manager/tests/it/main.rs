//! The `hotpatch` binary, run as a user runs it.

mod inspect;
