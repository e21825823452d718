//! unified-manager: the coordinator of the hotpatch tiers and the `hotpatch` CLI.
//!
//! The [`Manager`] composes the byte, memory and server tiers behind goals: attach a
//! model, apply patches of any tier as one unit, run the coordinated pipelines
//! ([`Manager::safety`], [`Manager::optimize`], [`Manager::boost`]), each reported step
//! by step and revertible as one unit ([`Manager::revert_pipeline`]), and apply presets
//! kept in the configuration directory ([`ConfigDir`]). The CLI in `main.rs` is glue
//! over the libraries and the only place that prints.

#![forbid(unsafe_code)]

pub mod boost;
pub mod config;
pub mod demo;
pub mod error;
pub mod fleet;
pub mod manager;
pub mod optimize;
pub mod plot;
pub mod preset;
pub mod reach;
pub mod report;
pub mod safety;
pub mod server;
pub mod surgery;

pub use boost::BoostOptions;
pub use config::{ConfigExport, SCHEMA_VERSION};
pub use error::{Error, Result};
pub use manager::{Manager, ManagerStats, ModelId, Patch, Receipt};
pub use optimize::{OptimizeOptions, OptimizePlan};
pub use preset::{ConfigDir, MemoryPatchSpec, Preset, Settings, TransformSpec};
pub use report::{PipelineReport, Step, StepResult, Tier, Undo};
pub use safety::{BoundSafetyPlan, Repair, SafetyOptions, SafetyPlan, ServerDefaults};
