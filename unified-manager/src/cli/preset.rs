//! `hotpatch preset save|list|show|apply|delete` and `hotpatch config export|import`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use memory_tier::AttachMode;
use serde_json::json;
use unified_manager::{Manager, Preset, Tier};

use super::pipeline::{ConfigDirArg, ServerArgs, attach_server};

/// A preset command.
#[derive(Debug, clap::Subcommand)]
pub enum PresetCommand {
    /// Check a preset document (TOML) and store it under its name.
    Save {
        /// The preset document.
        file: PathBuf,
        /// Store it under this name instead of the document's.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        config: ConfigDirArg,
        /// Check it and say what would be stored; store nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON (the plan, with --dry-run).
        #[arg(long)]
        json: bool,
    },
    /// List the stored presets.
    List {
        #[command(flatten)]
        config: ConfigDirArg,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a stored preset.
    Show {
        /// The preset.
        name: String,
        #[command(flatten)]
        config: ConfigDirArg,
        /// Print JSON instead of TOML.
        #[arg(long)]
        json: bool,
    },
    /// Apply a stored preset to a model file (in place, journaled, as one transaction)
    /// and its server rules to a running proxy.
    Apply {
        /// The preset.
        name: String,
        /// The model file.
        file: PathBuf,
        #[command(flatten)]
        server: ServerArgs,
        #[command(flatten)]
        config: ConfigDirArg,
        /// Apply to a private copy-on-write view to check that every patch applies;
        /// write nothing and add no rules.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// An importance matrix (llama-imatrix's output): transforms that requantize a
        /// tensor it names use its weights, as llama-quantize --imatrix does.
        #[arg(long, value_name = "FILE")]
        imatrix: Option<PathBuf>,
    },
    /// Delete a stored preset.
    Delete {
        /// The preset.
        name: String,
        #[command(flatten)]
        config: ConfigDirArg,
        /// Check that it exists and say what would be removed; delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON (the plan, with --dry-run).
        #[arg(long)]
        json: bool,
    },
}

pub fn preset(command: &PresetCommand) -> anyhow::Result<()> {
    match command {
        PresetCommand::Save {
            file,
            name,
            config,
            dry_run,
            json,
        } => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("read {}", file.display()))?;
            let mut preset = Preset::from_toml(&file.display().to_string(), &text)?;
            if let Some(name) = name {
                preset.name = name.clone();
            }
            let config = config.open()?;
            let plan = config.plan_save_preset(&preset)?;
            if super::plan::run(plan, *dry_run, *json)?.is_some() {
                println!(
                    "saved preset {} v{} to {}",
                    preset.name,
                    preset.version,
                    config.preset_file(&preset.name)?.display()
                );
            }
        }
        PresetCommand::List { config, json } => {
            let presets = config.open()?.presets()?;
            if *json {
                let list: Vec<_> = presets
                    .iter()
                    .map(|p| json!({"name": p.name, "version": p.version, "description": p.description,
                        "memory_patches": p.memory_patches.len(), "byte_patches": p.byte_patches.len(),
                        "server_rules": p.server_rules.len()}))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if presets.is_empty() {
                println!("no presets");
            } else {
                for p in &presets {
                    println!(
                        "{} v{}: {} memory, {} byte patches, {} server rules{}",
                        p.name,
                        p.version,
                        p.memory_patches.len(),
                        p.byte_patches.len(),
                        p.server_rules.len(),
                        if p.description.is_empty() {
                            String::new()
                        } else {
                            format!(" - {}", p.description)
                        }
                    );
                }
            }
        }
        PresetCommand::Show { name, config, json } => {
            let preset = config.open()?.load_preset(name)?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&preset)?);
            } else {
                print!("{}", preset.to_toml()?);
            }
        }
        PresetCommand::Apply {
            name,
            file,
            server,
            config,
            dry_run,
            json,
            imatrix,
        } => {
            let imatrix = match imatrix {
                Some(path) => Some(byte_tier::imatrix::ImportanceMatrix::read(path)?),
                None => None,
            };
            let config = config.open()?;
            let mut preset = config.load_preset(name)?;
            let manager = Manager::new();
            let skipped_rules = if *dry_run {
                std::mem::take(&mut preset.server_rules)
            } else {
                attach_server(&manager, server, &config)?;
                Vec::new()
            };
            if super::sets::open_for_rewrite(file, *dry_run)?.is_some() {
                return apply_to_set(
                    file,
                    &manager,
                    &preset,
                    imatrix.as_ref(),
                    &skipped_rules,
                    *dry_run,
                    *json,
                );
            }
            let mode = if *dry_run {
                AttachMode::Private
            } else {
                AttachMode::Shared
            };
            let id = manager
                .attach(file, mode)
                .with_context(|| format!("attach {}", file.display()))?;
            // Planned once (on a private view for a dry run: no journal is opened), and
            // that plan is what is reported or applied.
            let plan = manager.plan_preset_weighted(id, &preset, imatrix.as_ref())?;
            let list = |receipts: &[unified_manager::manager::Receipt]| -> Vec<serde_json::Value> {
                receipts
                    .iter()
                    .map(|r| json!({"name": r.name, "tier": format!("{:?}", r.tier).to_lowercase(),
                        "memory_patch": r.memory_patch.map(|u| u.to_string()), "journal_transaction": r.journal_transaction}))
                    .collect()
            };
            let details = json!({"preset": preset.name, "version": preset.version,
                "applied": list(&plan.receipts()), "bytes_written": plan.memory.bytes,
                "rules_not_added": skipped_rules.iter().map(|r| &r.name).collect::<Vec<_>>()});
            let plan = super::plan::Detailed {
                plan: plan.on(&manager),
                details,
            };
            let applied = super::plan::run(plan, *dry_run, *json);
            let bytes = manager.stats().bytes_modified;
            manager.detach_all(false)?;
            let Some(receipts) = applied? else {
                return Ok(());
            };
            let transaction = receipts.iter().find_map(|r| r.journal_transaction);
            if *json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(
                        &json!({"preset": preset.name, "version": preset.version,
                        "dry_run": false, "applied": list(&receipts), "bytes_written": bytes,
                        "rules_not_added": skipped_rules.iter().map(|r| &r.name).collect::<Vec<_>>()})
                    )?
                );
                return Ok(());
            }
            println!(
                "applied preset {} v{} to {}",
                preset.name,
                preset.version,
                file.display()
            );
            for r in &receipts {
                println!("  {:<7} {}", format!("{:?}", r.tier).to_lowercase(), r.name);
            }
            println!("{bytes} bytes written");
            if let Some(t) = transaction {
                println!("undo: hotpatch revert {} {t}", file.display());
            }
            if receipts.iter().any(|r| r.tier == Tier::Server) {
                println!("undo the rules: DELETE /admin/rules/NAME on the proxy");
            }
        }
        PresetCommand::Delete {
            name,
            config,
            dry_run,
            json,
        } => {
            let config = config.open()?;
            let plan = config.plan_delete_preset(name)?;
            if super::plan::run(plan, *dry_run, *json)?.is_some() {
                println!("deleted preset {name}");
            }
        }
    }
    Ok(())
}

/// `preset apply` given a shard of several: every patch goes to the shard that holds its
/// tensor, and all of them are written as one set transaction (`revert --set` undoes
/// it), then the rules are added.
fn apply_to_set(
    file: &Path,
    manager: &Manager,
    preset: &unified_manager::preset::Preset,
    imatrix: Option<&byte_tier::imatrix::ImportanceMatrix>,
    skipped_rules: &[unified_manager::server::Rule],
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let plan = manager
        .plan_preset_of_set(file, preset, imatrix)
        .with_context(|| {
            format!(
                "plan preset {} on the set of {}",
                preset.name,
                file.display()
            )
        })?;
    let list = |receipts: &[unified_manager::manager::Receipt]| -> Vec<serde_json::Value> {
        receipts
            .iter()
            .map(|r| json!({"name": r.name, "tier": format!("{:?}", r.tier).to_lowercase()}))
            .collect()
    };
    let rules_not_added: Vec<&String> = skipped_rules.iter().map(|r| &r.name).collect();
    let details = json!({"preset": preset.name, "version": preset.version,
        "applied": list(&plan.receipts()), "bytes_written": plan.bytes,
        "rules_not_added": rules_not_added});
    let plan = super::plan::Detailed {
        plan: plan.on(manager),
        details,
    };
    let Some(applied) = super::plan::run(plan, dry_run, json)? else {
        return Ok(());
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"preset": preset.name,
                "version": preset.version, "dry_run": false, "applied": list(&applied.receipts),
                "bytes_written": applied.bytes, "set_transaction": applied.set_transaction,
                "rules_not_added": rules_not_added}))?
        );
        return Ok(());
    }
    println!(
        "applied preset {} v{} to the set of {}",
        preset.name,
        preset.version,
        file.display()
    );
    for r in &applied.receipts {
        println!("  {:<7} {}", format!("{:?}", r.tier).to_lowercase(), r.name);
    }
    println!("{} bytes written", applied.bytes);
    if let Some(t) = applied.set_transaction {
        println!("undo: hotpatch revert --set {} {t}", file.display());
    }
    if applied.receipts.iter().any(|r| r.tier == Tier::Server) {
        println!("undo the rules: DELETE /admin/rules/NAME on the proxy");
    }
    Ok(())
}

/// A configuration command.
#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Write every preset and setting to one JSON file (with a schema version).
    Export {
        /// The file to write.
        file: PathBuf,
        #[command(flatten)]
        config: ConfigDirArg,
    },
    /// Check an exported file (errors name the field) and store its settings and presets.
    Import {
        /// The exported file.
        file: PathBuf,
        #[command(flatten)]
        config: ConfigDirArg,
        /// Check it and say what would be stored; store nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON (the plan, with --dry-run).
        #[arg(long)]
        json: bool,
    },
}

pub fn config(command: &ConfigCommand) -> anyhow::Result<()> {
    match command {
        ConfigCommand::Export { file, config } => {
            let config = config.open()?;
            let export = config.export_to(file)?;
            println!(
                "exported {} presets and the settings of {} to {} (schema {})",
                export.presets.len(),
                config.path().display(),
                file.display(),
                export.schema_version
            );
        }
        ConfigCommand::Import {
            file,
            config,
            dry_run,
            json,
        } => {
            let config = config.open()?;
            let plan = config.plan_import_from(file)?;
            if let Some(outcome) = super::plan::run(plan, *dry_run, *json)? {
                println!(
                    "imported {} presets ({} replaced) and the settings into {}",
                    outcome.presets.len(),
                    outcome.replaced.len(),
                    config.path().display()
                );
            }
        }
    }
    Ok(())
}
