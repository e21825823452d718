//! unified-manager: the coordinator of the hotpatch tiers and the `hotpatch` CLI.
//!
//! It will hold the `Manager` that composes the byte, memory and server tiers behind
//! goals (the optimize, safety and boost pipelines), presets and configuration. For now
//! it holds the embedded demo model that the README's first command inspects; the CLI
//! in `main.rs` is glue over the libraries and the only place that prints.

#![forbid(unsafe_code)]

pub mod demo;
