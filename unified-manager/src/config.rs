//! Configuration export and import: every preset and setting in one JSON document with
//! a schema version.

use std::path::{Path, PathBuf};

use byte_tier::plan::{FileStamp, Plan};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::preset::{ConfigDir, Preset, Settings, write_atomic};

/// The version of the export format this build writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// An exported configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigExport {
    /// The export format's version ([`SCHEMA_VERSION`]).
    pub schema_version: u32,
    /// The settings.
    pub settings: Settings,
    /// Every preset, by name.
    pub presets: Vec<Preset>,
}

/// What an import did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportOutcome {
    /// Presets written, by name.
    pub presets: Vec<String>,
    /// Presets of the same name that were replaced.
    pub replaced: Vec<String>,
}

impl ConfigDir {
    /// Everything in the directory as one document.
    pub fn export(&self) -> Result<ConfigExport> {
        Ok(ConfigExport {
            schema_version: SCHEMA_VERSION,
            settings: self.settings()?,
            presets: self.presets()?,
        })
    }

    /// Writes [`ConfigDir::export`] to `path` as JSON.
    pub fn export_to(&self, path: &Path) -> Result<ConfigExport> {
        let export = self.export()?;
        let mut text = serde_json::to_string_pretty(&export)
            .map_err(|e| Error::invalid(path.display().to_string(), "", e.to_string()))?;
        text.push('\n');
        write_atomic(path, text.as_bytes())?;
        Ok(export)
    }

    /// Reads an exported document, checks all of it (errors name the field at fault,
    /// `presets[1].memory_patch[0].transform`), then writes the settings and every
    /// preset. Nothing is written unless everything is valid.
    pub fn import_from(&self, path: &Path) -> Result<ImportOutcome> {
        let document = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
        check_schema_version(&document, &text)?;
        let export = parse_export(&document, &text)?;
        self.import(&document, &export)
    }

    /// What [`import_from`](Self::import_from) would write, checked, nothing written.
    pub fn plan_import_from(&self, path: &Path) -> Result<ConfigPlan> {
        let document = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io("read", path, e))?;
        check_schema_version(&document, &text)?;
        let export = parse_export(&document, &text)?;
        self.plan_import(&document, &export)
    }

    /// Checks and writes an export.
    pub fn import(&self, document: &str, export: &ConfigExport) -> Result<ImportOutcome> {
        self.plan_import(document, export)?.apply()
    }

    /// Checks an export and plans writing its settings and presets; nothing is written.
    pub fn plan_import(&self, document: &str, export: &ConfigExport) -> Result<ConfigPlan> {
        if export.schema_version != SCHEMA_VERSION {
            return Err(Error::invalid(
                document,
                "schema_version",
                format!(
                    "{} is not supported (this build reads {SCHEMA_VERSION})",
                    export.schema_version
                ),
            ));
        }
        export
            .settings
            .validate(document)
            .map_err(|e| prefix(e, "settings"))?;
        let mut names = std::collections::HashSet::new();
        for (i, preset) in export.presets.iter().enumerate() {
            preset
                .validate(document)
                .map_err(|e| prefix(e, &format!("presets[{i}]")))?;
            if !names.insert(preset.name.as_str()) {
                return Err(Error::invalid(
                    document,
                    format!("presets[{i}].name"),
                    format!("{:?} is used twice", preset.name),
                ));
            }
        }
        let existing: Vec<String> = self.presets()?.into_iter().map(|p| p.name).collect();
        let mut plan = ConfigPlan::new(self.path());
        plan.write(
            self.settings_path(),
            self.settings_text(&export.settings)?.into_bytes(),
        )?;
        for preset in &export.presets {
            plan.write(
                self.preset_file(&preset.name)?,
                preset.to_toml()?.into_bytes(),
            )?;
            if existing.contains(&preset.name) {
                plan.replaced.push(preset.name.clone());
            }
            plan.presets.push(preset.name.clone());
        }
        Ok(plan)
    }

    /// Plans storing `preset` (validated first), replacing one of the same name.
    pub fn plan_save_preset(&self, preset: &Preset) -> Result<ConfigPlan> {
        preset.validate(&preset.name)?;
        let path = self.preset_file(&preset.name)?;
        let mut plan = ConfigPlan::new(self.path());
        if path.exists() {
            plan.replaced.push(preset.name.clone());
        }
        plan.write(path, preset.to_toml()?.into_bytes())?;
        plan.presets.push(preset.name.clone());
        Ok(plan)
    }

    /// Plans deleting the stored preset `name` (refused when there is none).
    pub fn plan_delete_preset(&self, name: &str) -> Result<ConfigPlan> {
        let path = self.preset_file(name)?;
        let Some(stamp) = FileStamp::of_metadata(&path)? else {
            return Err(Error::NoSuchPreset(name.to_owned()));
        };
        let mut plan = ConfigPlan::new(self.path());
        plan.removes.push(path);
        plan.remove_stamps.push(stamp);
        plan.presets.push(name.to_owned());
        Ok(plan)
    }
}

/// One file a [`ConfigPlan`] writes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ConfigFile {
    /// Where.
    pub path: PathBuf,
    /// Its length.
    pub n_bytes: u64,
    /// Whether it replaces a file that is there.
    pub replaces: bool,
}

/// Changes to a configuration directory, planned and not yet made: whole files written
/// atomically, files removed. Applying refuses with a stale-plan error when one of
/// them changed (or appeared) since the plan was made.
#[derive(Debug, Serialize)]
pub struct ConfigPlan {
    /// `"config"`.
    pub kind: &'static str,
    /// The configuration directory.
    pub file: PathBuf,
    /// Files written.
    pub files: Vec<ConfigFile>,
    /// Files removed.
    pub removes: Vec<PathBuf>,
    /// The presets written or removed, by name.
    pub presets: Vec<String>,
    /// Presets of the same name that are replaced.
    pub replaced: Vec<String>,
    #[serde(skip)]
    contents: Vec<Vec<u8>>,
    #[serde(skip)]
    stamps: Vec<Option<FileStamp>>,
    #[serde(skip)]
    remove_stamps: Vec<FileStamp>,
}

impl ConfigPlan {
    fn new(dir: &Path) -> ConfigPlan {
        ConfigPlan {
            kind: "config",
            file: dir.to_owned(),
            files: Vec::new(),
            removes: Vec::new(),
            presets: Vec::new(),
            replaced: Vec::new(),
            contents: Vec::new(),
            stamps: Vec::new(),
            remove_stamps: Vec::new(),
        }
    }

    fn write(&mut self, path: PathBuf, content: Vec<u8>) -> Result<()> {
        let stamp = FileStamp::of_metadata(&path)?;
        self.files.push(ConfigFile {
            path,
            n_bytes: content.len() as u64,
            replaces: stamp.is_some(),
        });
        self.contents.push(content);
        self.stamps.push(stamp);
        Ok(())
    }
}

impl Plan for ConfigPlan {
    type Applied = ImportOutcome;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.files.is_empty() && self.removes.is_empty()
    }

    fn apply(self) -> Result<ImportOutcome> {
        for (file, stamp) in self.files.iter().zip(&self.stamps) {
            FileStamp::check_path(&file.path, stamp.as_ref())?;
        }
        for stamp in &self.remove_stamps {
            stamp.check_unread()?;
        }
        for (file, content) in self.files.iter().zip(&self.contents) {
            write_atomic(&file.path, content)?;
        }
        for path in &self.removes {
            std::fs::remove_file(path).map_err(|e| Error::io("remove", path, e))?;
        }
        Ok(ImportOutcome {
            presets: self.presets,
            replaced: self.replaced,
        })
    }
}

/// The schema version first: a document of another version is refused for that, not
/// for a field this version reads differently.
fn check_schema_version(document: &str, text: &str) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Version {
        schema_version: Option<u32>,
    }
    if let Ok(Version {
        schema_version: Some(version),
    }) = serde_json::from_str::<Version>(text)
        && version != SCHEMA_VERSION
    {
        return Err(Error::invalid(
            document,
            "schema_version",
            format!("{version} is not supported (this build reads {SCHEMA_VERSION})"),
        ));
    }
    Ok(())
}

/// Parses an export, naming the field at fault.
pub fn parse_export(document: &str, text: &str) -> Result<ConfigExport> {
    let mut deserializer = serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let field = e.path().to_string();
        Error::invalid(
            document,
            if field == "." { String::new() } else { field },
            e.into_inner().to_string(),
        )
    })
}

/// Puts `prefix` in front of the field an invalid-document error names.
fn prefix(error: Error, prefix: &str) -> Error {
    match error {
        Error::Invalid {
            document,
            field,
            message,
        } => Error::Invalid {
            document,
            field: if field.is_empty() {
                prefix.to_owned()
            } else {
                format!("{prefix}.{field}")
            },
            message,
        },
        other => other,
    }
}
