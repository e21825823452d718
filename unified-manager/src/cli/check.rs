//! `hotpatch verify` and `hotpatch diff`.

use std::path::PathBuf;

use anyhow::{Context, bail};
use byte_tier::codec;
use byte_tier::diff::diff_sets;
use byte_tier::plan::{FileStamp, NewFilesPlan, NoDetails};
use byte_tier::split;
use byte_tier::verify::Manifest;
use byte_tier::{Gguf, MappedFile};
use rayon::prelude::*;
use serde_json::json;

use super::progress::bytes_bar;

/// Arguments of `hotpatch verify`.
#[derive(Debug, clap::Args)]
pub struct VerifyArgs {
    /// The file.
    pub file: PathBuf,
    /// Write the per-tensor SHA-256 manifest (gguf-hash's format) to this file.
    #[arg(long, value_name = "MANIFEST")]
    pub write_manifest: Option<PathBuf>,
    /// Check the tensors against a manifest (ours or gguf-hash's output).
    #[arg(long, value_name = "MANIFEST")]
    pub check: Option<PathBuf>,
    /// With --write-manifest: say what would be written and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// A model as a command sees it: the shard set a shard belongs to, or a single file.
struct Model {
    maps: Vec<MappedFile>,
}

impl Model {
    fn open(path: &std::path::Path) -> anyhow::Result<Model> {
        let maps = match split::open_set_of(path)? {
            Some(set) => set.into_files(),
            None => vec![MappedFile::open(path)?],
        };
        Ok(Model { maps })
    }

    fn parse(&self) -> anyhow::Result<Vec<Gguf<'_>>> {
        self.maps
            .iter()
            .map(|m| {
                m.parse()
                    .with_context(|| format!("{} is not a valid GGUF file", m.path().display()))
            })
            .collect()
    }
}

pub fn verify(args: &VerifyArgs) -> anyhow::Result<()> {
    // A shard of a set is verified with its whole set: every shard is checked and
    // scanned, and one manifest covers every tensor.
    let model = Model::open(&args.file)?;
    let shards = model.parse()?;
    let n_tensors: usize = shards.iter().map(|g| g.tensors().len()).sum();
    let file_len: u64 = shards.iter().map(Gguf::file_len).sum();
    let diagnostics: Vec<String> = shards
        .iter()
        .flat_map(|g| g.diagnostics().iter().map(ToString::to_string))
        .collect();
    let bar = bytes_bar("scanning", file_len);
    // Every tensor is scanned for NaN and infinity; types without a decoder are listed.
    let pairs: Vec<_> = shards
        .iter()
        .flat_map(|g| g.tensors().iter().map(move |t| (g, t)))
        .collect();
    let scans: Vec<(String, Result<codec::NonFiniteReport, byte_tier::Error>)> = pairs
        .par_iter()
        .map(|(gguf, t)| {
            let r = codec::scan_tensor(gguf, t);
            bar.inc(t.n_bytes);
            (t.name.clone(), r)
        })
        .collect();
    bar.finish_and_clear();
    let mut non_finite = Vec::new();
    let mut unscanned = Vec::new();
    for (name, scan) in &scans {
        match scan {
            Ok(r) if !r.is_clean() => non_finite.push((name.clone(), r.clone())),
            Ok(_) => {}
            Err(e) => unscanned.push((name.clone(), e.to_string())),
        }
    }
    let manifest =
        (args.write_manifest.is_some() || args.check.is_some()).then(|| Manifest::of_set(&shards));
    let label = args.file.display().to_string();
    // The manifest file is a plan like every other write: reported with --dry-run (in
    // the JSON report under "plan" with --json), written otherwise.
    let mut plan_json = None;
    if let (Some(path), Some(m)) = (&args.write_manifest, &manifest) {
        let first = &model.maps[0];
        let header = shards[0].data_offset();
        let plan = NewFilesPlan::new(
            Some(FileStamp::take(
                first.path(),
                first.bytes(),
                std::iter::once(0..header),
            )?),
            vec![(path.clone(), m.to_text(&label).into_bytes())],
            NoDetails {},
        )?;
        if args.dry_run && args.json {
            plan_json = Some(serde_json::to_value(&plan)?);
        } else {
            super::plan::run(plan, args.dry_run, false)
                .with_context(|| format!("write {}", path.display()))?;
        }
    }
    let check = match (&args.check, &manifest) {
        (Some(path), Some(m)) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("read {}", path.display()))?;
            Some(m.check(&text)?)
        }
        _ => None,
    };
    let ok = non_finite.is_empty() && check.as_ref().is_none_or(|c| c.is_ok());
    if args.json {
        let nf: Vec<_> = non_finite
            .iter()
            .map(|(n, r)| json!({"tensor": n, "nan": r.nan_count, "inf": r.inf_count, "nan_scales": r.nan_scales,
                "inf_scales": r.inf_scales, "first_offsets": r.first_offsets}))
            .collect();
        let un: Vec<_> = unscanned
            .iter()
            .map(|(n, e)| json!({"tensor": n, "reason": e}))
            .collect();
        let check_json = check.as_ref().map(|c| {
            json!({"matched": c.matched, "mismatched": c.mismatched, "missing": c.missing,
                "unlisted": c.unlisted, "whole_matches": c.whole_matches})
        });
        println!(
            "{}",
            json!({"ok": ok, "structure": "valid", "diagnostics": diagnostics, "tensors": n_tensors,
                "shards": shards.len(), "non_finite": nf, "unscanned": un, "manifest": check_json,
                "plan": plan_json})
        );
    } else {
        let shard_note = if shards.len() > 1 {
            format!(", a set of {} shards", shards.len())
        } else {
            String::new()
        };
        println!(
            "structure: valid (GGUF v{}, {n_tensors} tensors, {file_len} bytes{shard_note})",
            shards[0].version(),
        );
        for d in &diagnostics {
            println!("note: {d}");
        }
        if non_finite.is_empty() {
            println!(
                "values: no NaN or infinity in {} scanned tensors",
                scans.len() - unscanned.len()
            );
        }
        for (name, r) in &non_finite {
            println!(
                "values: {name}: {} NaN, {} inf, {} bad scales; first at elements {:?}",
                r.nan_count,
                r.inf_count,
                r.nan_scales + r.inf_scales,
                r.first_offsets
            );
        }
        for (name, reason) in &unscanned {
            println!("values: {name} not scanned: {reason}");
        }
        if let Some(path) = args.write_manifest.as_ref().filter(|_| !args.dry_run) {
            println!(
                "manifest: wrote {} tensor digests to {}",
                n_tensors,
                path.display()
            );
        }
        if let Some(c) = &check {
            println!(
                "manifest: {} match, {} differ {:?}, {} missing, {} unlisted, whole file {}",
                c.matched,
                c.mismatched.len(),
                c.mismatched,
                c.missing.len(),
                c.unlisted.len(),
                match c.whole_matches {
                    Some(true) => "matches",
                    Some(false) => "differs",
                    None => "not listed",
                }
            );
        }
    }
    if !ok {
        bail!("verification failed");
    }
    Ok(())
}

/// Arguments of `hotpatch diff`.
#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// The first file.
    pub a: PathBuf,
    /// The second file.
    pub b: PathBuf,
    /// Also draw the per-layer relative change of the weights into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run_diff(args: &DiffArgs) -> anyhow::Result<()> {
    // A shard stands for its whole set: tensors are matched by name across shards.
    let (model_a, model_b) = (Model::open(&args.a)?, Model::open(&args.b)?);
    let (shards_a, shards_b) = (model_a.parse()?, model_b.parse()?);
    let d = diff_sets(&shards_a, &shards_b);
    let (a, b) = (&shards_a[0], &shards_b[0]);
    if let Some(path) = &args.plot {
        if shards_a.len() > 1 || shards_b.len() > 1 {
            bail!("--plot compares single files; merge a shard set first");
        }
        let changes = unified_manager::plot::layer_changes(a, b)?;
        let title = format!(
            "{} -> {}",
            args.a.file_name().unwrap_or_default().to_string_lossy(),
            args.b.file_name().unwrap_or_default().to_string_lossy()
        );
        unified_manager::plot::plot_layer_changes(&changes, &d.tensors_changed, &title, path)?;
        if !args.json {
            println!("per-layer change plotted to {}", path.display());
        }
    }
    if args.json {
        let changed: Vec<_> = d
            .tensors_changed
            .iter()
            .map(|c| json!({"name": c.name, "layout_change": c.layout_change, "bytes_changed": c.bytes_changed,
                "max_abs": c.max_abs, "rms": c.rms, "rms_a": c.rms_a}))
            .collect();
        println!(
            "{}",
            json!({"identical": d.is_empty(), "keys_added": d.keys_added, "keys_removed": d.keys_removed,
                "keys_changed": d.keys_changed, "tensors_added": d.tensors_added, "tensors_removed": d.tensors_removed,
                "tensors_changed": changed, "tensors_unchanged": d.tensors_unchanged})
        );
        return Ok(());
    }
    if d.is_empty() {
        println!(
            "identical metadata and tensors ({} tensors)",
            d.tensors_unchanged
        );
        return Ok(());
    }
    for (label, keys) in [
        ("+ key", &d.keys_added),
        ("- key", &d.keys_removed),
        ("~ key", &d.keys_changed),
    ] {
        for k in keys {
            let value = |g: &byte_tier::Gguf<'_>| {
                g.get(k)
                    .map(|v| truncate(&v.to_string()))
                    .unwrap_or_default()
            };
            match label {
                "+ key" => println!("{label} {k} = {}", value(b)),
                "- key" => println!("{label} {k} = {}", value(a)),
                _ => println!("{label} {k}: {} -> {}", value(a), value(b)),
            }
        }
    }
    for t in &d.tensors_added {
        println!("+ tensor {t}");
    }
    for t in &d.tensors_removed {
        println!("- tensor {t}");
    }
    for c in &d.tensors_changed {
        println!(
            "~ tensor {}",
            unified_manager::plot::describe_tensor_change(c)
        );
    }
    println!(
        "{} keys added, {} removed, {} changed; {} tensors added, {} removed, {} changed, {} identical",
        d.keys_added.len(),
        d.keys_removed.len(),
        d.keys_changed.len(),
        d.tensors_added.len(),
        d.tensors_removed.len(),
        d.tensors_changed.len(),
        d.tensors_unchanged
    );
    Ok(())
}

fn truncate(text: &str) -> String {
    if text.chars().count() > 80 {
        format!("{}...", text.chars().take(77).collect::<String>())
    } else {
        text.to_owned()
    }
}
