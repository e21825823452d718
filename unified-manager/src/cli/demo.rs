//! `hotpatch demo`: the main job on an embedded default model.

use std::path::PathBuf;

use anyhow::Context;
use unified_manager::demo::{DemoShape, write_demo_model};

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
    let path = write_demo_model(&dir, DemoShape::default()).context("write the demo model")?;
    println!("Wrote a llama-shaped demo model to {}\n", path.display());
    super::inspect::run(&super::inspect::InspectArgs {
        file: path,
        json: false,
        full: false,
    })
}
