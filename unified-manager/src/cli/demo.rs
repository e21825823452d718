//! `hotpatch demo`: the main job on an embedded default model.

use std::path::PathBuf;

use anyhow::Context;
use unified_manager::demo::{DemoShape, walkthrough, write_demo_model};

/// Arguments of `hotpatch demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the generated model in this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    keep: Option<PathBuf>,
}

pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let temp;
    let dir = match &args.keep {
        Some(dir) => {
            std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
            dir.clone()
        }
        None => {
            temp = tempfile::tempdir().context("create a temporary directory")?;
            temp.path().to_owned()
        }
    };
    let started = std::time::Instant::now();
    let path = write_demo_model(&dir, DemoShape::default()).context("write the demo model")?;
    println!("== 1. Inspect a generated llama-shaped model ==");
    println!("{}\n", path.display());
    super::inspect::run(&super::inspect::InspectArgs {
        file: path.clone(),
        json: false,
        full: false,
    })?;
    let scenes = walkthrough(&path).context("the demo walk-through failed")?;
    for (i, scene) in scenes.iter().enumerate() {
        println!("\n== {}. {} ==", i + 2, scene.title);
        for line in &scene.lines {
            println!("{line}");
        }
    }
    println!(
        "\nDone in {:.2} s. {}",
        started.elapsed().as_secs_f64(),
        match &args.keep {
            Some(dir) => format!("The model and its original copy are in {}.", dir.display()),
            None => "The temporary directory is removed.".to_owned(),
        }
    );
    Ok(())
}
