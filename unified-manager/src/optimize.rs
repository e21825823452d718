//! The `optimize` pipeline: requantize selected tensors and prune listed layers in one
//! rewrite into a new file, reporting sizes before and after. The source file is never
//! changed; undoing the run removes the file it wrote (when unchanged since).

use std::path::{Path, PathBuf};
use std::time::Instant;

use byte_tier::edit::{PruneReport, Requantized, prune_layers, requantize_tensors_weighted};
use byte_tier::imatrix::ImportanceMatrix;
use byte_tier::plan::RewritePlan;
use byte_tier::{GgmlType, Gguf, GgufWriter, MappedFile};
use regex::Regex;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::manager::Manager;
use crate::report::{PipelineReport, StepOutcome, Tier};

/// What the optimize pipeline does.
#[derive(Clone, Debug)]
pub struct OptimizeOptions {
    /// The file to write (never the input).
    pub output: PathBuf,
    /// Tensors whose names match, converted to this type.
    pub requantize: Option<(Regex, GgmlType)>,
    /// Blocks to remove (0-based).
    pub prune: Vec<u64>,
    /// Plan and report, write nothing.
    pub dry_run: bool,
    /// Importance weights for the requantization (names of the input model).
    pub imatrix: Option<std::sync::Arc<ImportanceMatrix>>,
}

fn hex_sha256(path: &Path) -> Result<String> {
    let map = MappedFile::open(path)?;
    Ok(byte_tier::ops::to_hex(&byte_tier::ops::sha256(map.bytes())))
}

/// Removes a file a pipeline wrote, when its SHA-256 is still `sha256`.
pub(crate) fn remove_output(path: &Path, sha256: &str) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    if hex_sha256(path)? != sha256 {
        return Err(Error::Refused(format!(
            "{} changed since the pipeline wrote it; it is left in place",
            path.display()
        )));
    }
    std::fs::remove_file(path).map_err(|e| Error::io("remove", path, e))
}

fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// What the edit did, for the report.
#[derive(Debug, Serialize)]
struct Edits {
    pruned: Option<PruneReport>,
    removed_bytes: u64,
    requantized: Vec<Requantized>,
    planned_len: u64,
}

fn edit<'a>(
    gguf: &byte_tier::Gguf<'a>,
    writer: &mut GgufWriter<'a>,
    options: &OptimizeOptions,
) -> byte_tier::Result<Edits> {
    let mut edits = Edits {
        pruned: None,
        removed_bytes: 0,
        requantized: Vec::new(),
        planned_len: 0,
    };
    // Requantize first, under the input's names (which the importance matrix uses);
    // pruning then drops or renumbers the planned tensors with their new data.
    if let Some((pattern, target)) = &options.requantize {
        let select = |name: &str| pattern.is_match(name);
        edits.requantized = requantize_tensors_weighted(
            gguf,
            writer,
            &select,
            *target,
            options.imatrix.as_deref(),
        )?;
    }
    if !options.prune.is_empty() {
        let report = prune_layers(gguf, writer, &options.prune)?;
        edits.removed_bytes = report
            .tensors_removed
            .iter()
            .filter_map(|name| gguf.tensor(name))
            .map(|t| t.n_bytes)
            .sum();
        edits
            .requantized
            .retain(|r| !report.tensors_removed.contains(&r.name));
        edits.pruned = Some(report);
    }
    edits.planned_len = writer.layout()?.file_len;
    Ok(edits)
}

/// An optimize run planned by [`Manager::plan_optimize`]: the rewrite into the output
/// (a `RewritePlan`, made once: requantized data included) and the report of the prune
/// and requantize steps. Serialized, it is the report's fields and the plan's.
pub struct OptimizePlan<'a> {
    manager: &'a Manager,
    report: PipelineReport,
    rewrite: RewritePlan<'a, Edits>,
}

impl std::fmt::Debug for OptimizePlan<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OptimizePlan")
            .field("report", &self.report)
            .field("rewrite", &self.rewrite)
            .finish_non_exhaustive()
    }
}

impl Serialize for OptimizePlan<'_> {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct Both<'p, 'a> {
            #[serde(flatten)]
            report: &'p PipelineReport,
            #[serde(flatten)]
            rewrite: &'p RewritePlan<'a, Edits>,
        }
        Both {
            report: &self.report,
            rewrite: &self.rewrite,
        }
        .serialize(serializer)
    }
}

impl<'a> OptimizePlan<'a> {
    /// The report of the planned steps.
    pub fn report(&self) -> &PipelineReport {
        &self.report
    }

    /// Reports progress (bytes written, total) while the output is written.
    pub fn with_progress(mut self, progress: impl FnMut(u64, u64) + 'a) -> Self {
        self.rewrite = self.rewrite.with_progress(progress);
        self
    }
}

impl byte_tier::plan::Plan for OptimizePlan<'_> {
    type Applied = PipelineReport;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.rewrite.is_noop()
    }

    /// Writes the output as planned (refused when the input changed since), then
    /// records how to undo the run.
    fn apply(self) -> Result<PipelineReport> {
        let OptimizePlan {
            manager,
            mut report,
            rewrite,
        } = self;
        let started = Instant::now();
        let outcome = rewrite.write()?;
        let (before, after) = (outcome.input_len, outcome.bytes_written);
        let sha256 = hex_sha256(&outcome.output)?;
        report.undo.output = Some((outcome.output, sha256));
        report.push(
            "write",
            Tier::Byte,
            started,
            StepOutcome::ok(
                format!(
                    "wrote the output: {before} -> {after} bytes ({:+.1}%)",
                    (after as f64 / before.max(1) as f64 - 1.0) * 100.0
                ),
                after,
            ),
        );
        manager.completed(&report);
        Ok(report)
    }
}

impl Manager {
    /// Runs the optimize pipeline on `input`: one rewrite into `options.output` that
    /// prunes the listed layers and requantizes the selected tensors. `progress` gets
    /// (bytes written, bytes in all) while the file is written.
    pub fn optimize(
        &self,
        input: &Path,
        options: &OptimizeOptions,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<PipelineReport> {
        let map = MappedFile::open(input)?;
        let gguf = map.parse()?;
        let plan = self
            .plan_optimize(input, &gguf, options)?
            .with_progress(progress);
        if options.dry_run {
            return Ok(plan.report);
        }
        byte_tier::plan::Plan::apply(plan)
    }

    /// The planning steps of [`Manager::optimize`] on `input`, parsed as `gguf`: the
    /// prune and the requantization run once, into a rewrite plan; nothing is written.
    pub fn plan_optimize<'a>(
        &'a self,
        input: &Path,
        gguf: &Gguf<'a>,
        options: &OptimizeOptions,
    ) -> Result<OptimizePlan<'a>> {
        if same_file(input, &options.output) {
            return Err(Error::Refused(
                "optimize writes a new file: give an output other than the input (a running server maps the input, and a rewrite under it is never safe)".to_owned(),
            ));
        }
        if options.prune.is_empty() && options.requantize.is_none() {
            return Err(Error::Refused(
                "nothing to do: ask for a requantization, a prune, or both".to_owned(),
            ));
        }
        let mut report = PipelineReport::new("optimize", input.to_owned(), options.dry_run);
        let started = Instant::now();
        let rewrite = RewritePlan::new(input, Some(&options.output), gguf, |gguf, writer| {
            edit(gguf, writer, options)
        })?;
        let (bytes_before, bytes_after) = (gguf.file_len(), rewrite.size_after());
        let edits = rewrite.details();
        let elapsed = started;
        let outcome = match &edits.pruned {
            None => StepOutcome::skipped("no layers listed"),
            Some(p) => StepOutcome::ok(
                format!(
                    "blocks {} -> {}: {} tensors removed, {} renumbered, arrays trimmed: {}",
                    p.blocks_before,
                    p.blocks_after,
                    p.tensors_removed.len(),
                    p.tensors_renamed.len(),
                    if p.arrays_trimmed.is_empty() {
                        "none".to_owned()
                    } else {
                        p.arrays_trimmed.join(", ")
                    }
                ),
                edits.removed_bytes,
            ),
        };
        report.push("prune", Tier::Byte, elapsed, outcome);
        let outcome = match &options.requantize {
            None => StepOutcome::skipped("no requantization asked for"),
            Some((_, target)) if edits.requantized.is_empty() => StepOutcome::skipped(format!(
                "no selected tensor needed converting to {}",
                target.name()
            )),
            Some((_, target)) => {
                let before: u64 = edits.requantized.iter().map(|r| r.bytes_before).sum();
                let after: u64 = edits.requantized.iter().map(|r| r.bytes_after).sum();
                StepOutcome::ok(
                    format!(
                        "{} tensors to {}: {before} -> {after} bytes",
                        edits.requantized.len(),
                        target.name()
                    ),
                    after,
                )
            }
        };
        report.push("requantize", Tier::Byte, elapsed, outcome);
        if options.dry_run {
            report.push(
                "write",
                Tier::Byte,
                Instant::now(),
                StepOutcome::skipped(format!(
                    "dry run: {} would be {bytes_after} bytes (from {bytes_before})",
                    options.output.display()
                )),
            );
        }
        Ok(OptimizePlan {
            manager: self,
            report,
            rewrite,
        })
    }
}
