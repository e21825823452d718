//! The `hotpatch` binary, run as a user runs it.

mod agent;
mod commands;
mod crash;
mod edit;
mod fleet;
mod fleet_tls;
mod full_disk;
mod imatrix;
mod inspect;
mod lenient;
mod manage;
mod plans;
mod serve;
mod served;
mod shards;
mod surgery;
mod tensor;
