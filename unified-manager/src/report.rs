//! Pipeline reports: what each step did, on which tier, and how to undo the whole run.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use uuid::Uuid;

/// The layer a step worked on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// The file's bytes (rewrites, manifests).
    Byte,
    /// The live mapped region (journaled writes under page protection).
    Memory,
    /// The HTTP proxy (rules, cache).
    Server,
    /// The operating system (page cache, page locks).
    Os,
}

/// How a step ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "status", content = "reason")]
pub enum StepResult {
    /// Done.
    Ok,
    /// Not needed or not asked for.
    Skipped(String),
    /// Failed; the pipeline stopped and undid what it had done.
    Failed(String),
}

/// One step of a pipeline.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Step {
    /// The step's name.
    pub step: String,
    /// The tier it worked on.
    pub tier: Tier,
    /// What changed (or was found), in words.
    pub changed: String,
    /// Bytes changed (for writes) or examined (for reads and checks).
    pub bytes: u64,
    /// How long it took, in milliseconds.
    pub duration_ms: f64,
    /// How it ended.
    pub result: StepResult,
}

/// What undoes a pipeline run as one unit.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Undo {
    /// Memory-tier patches applied to the attached model.
    pub memory_patches: Vec<Uuid>,
    /// The file journal's transaction that recorded them, for shared file attachments
    /// (`hotpatch revert FILE --transaction N` undoes it from another process).
    pub journal_transaction: Option<u64>,
    /// The set journal's transaction that wrote a shard set in place
    /// (`hotpatch revert --set SHARD N` undoes it); left out of the JSON for a single file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub set_transaction: Option<u64>,
    /// Server rules added, by name.
    pub server_rules: Vec<String>,
    /// The server's response-cache setting before the run, when the run changed it.
    pub server_cache_before: Option<bool>,
    /// A file the run wrote, with its SHA-256: reverting removes it if unchanged.
    pub output: Option<(PathBuf, String)>,
    /// A boost held by the manager (page lock and advice), by its id.
    pub boost: Option<u32>,
}

/// The report of one pipeline run.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct PipelineReport {
    /// `safety`, `optimize` or `boost`.
    pub pipeline: &'static str,
    /// The model file.
    pub target: PathBuf,
    /// Whether nothing was written (a dry run).
    pub dry_run: bool,
    /// The steps in order.
    pub steps: Vec<Step>,
    /// Problems the run found and left as they are (for example non-finite values with
    /// no repair asked for); the CLI exits 1 when there are any.
    pub unresolved: Vec<String>,
    /// How to undo the run as one unit.
    pub undo: Undo,
}

impl PipelineReport {
    pub(crate) fn new(pipeline: &'static str, target: PathBuf, dry_run: bool) -> PipelineReport {
        PipelineReport {
            pipeline,
            target,
            dry_run,
            steps: Vec::new(),
            unresolved: Vec::new(),
            undo: Undo::default(),
        }
    }

    /// Whether every step succeeded or was skipped.
    pub fn succeeded(&self) -> bool {
        !self
            .steps
            .iter()
            .any(|s| matches!(s.result, StepResult::Failed(_)))
    }

    /// The step named `name`.
    pub fn step(&self, name: &str) -> Option<&Step> {
        self.steps.iter().find(|s| s.step == name)
    }

    pub(crate) fn push(&mut self, step: &str, tier: Tier, started: Instant, outcome: StepOutcome) {
        self.steps.push(Step {
            step: step.to_owned(),
            tier,
            changed: outcome.changed,
            bytes: outcome.bytes,
            duration_ms: millis(started.elapsed()),
            result: outcome.result,
        });
    }
}

/// What a step function hands back to be recorded.
#[derive(Debug)]
pub(crate) struct StepOutcome {
    pub changed: String,
    pub bytes: u64,
    pub result: StepResult,
}

impl StepOutcome {
    pub fn ok(changed: impl Into<String>, bytes: u64) -> StepOutcome {
        StepOutcome {
            changed: changed.into(),
            bytes,
            result: StepResult::Ok,
        }
    }

    pub fn skipped(reason: impl Into<String>) -> StepOutcome {
        let reason = reason.into();
        StepOutcome {
            changed: "nothing".to_owned(),
            bytes: 0,
            result: StepResult::Skipped(reason),
        }
    }

    pub fn failed(changed: impl Into<String>, reason: impl Into<String>) -> StepOutcome {
        StepOutcome {
            changed: changed.into(),
            bytes: 0,
            result: StepResult::Failed(reason.into()),
        }
    }
}

pub(crate) fn millis(duration: Duration) -> f64 {
    (duration.as_secs_f64() * 1e6).round() / 1e3
}
