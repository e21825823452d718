//! Configuration export and import: every preset and setting in one JSON document with
//! a schema version.

use std::path::Path;

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
        // The schema version first: a document of another version is refused for that,
        // not for a field this version reads differently.
        #[derive(serde::Deserialize)]
        struct Version {
            schema_version: Option<u32>,
        }
        if let Ok(Version {
            schema_version: Some(version),
        }) = serde_json::from_str::<Version>(&text)
            && version != SCHEMA_VERSION
        {
            return Err(Error::invalid(
                &document,
                "schema_version",
                format!("{version} is not supported (this build reads {SCHEMA_VERSION})"),
            ));
        }
        let export = parse_export(&document, &text)?;
        self.import(&document, &export)
    }

    /// Checks and writes an export.
    pub fn import(&self, document: &str, export: &ConfigExport) -> Result<ImportOutcome> {
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
        self.save_settings(&export.settings)?;
        let mut outcome = ImportOutcome {
            presets: Vec::new(),
            replaced: Vec::new(),
        };
        for preset in &export.presets {
            self.save_preset(preset)?;
            if existing.contains(&preset.name) {
                outcome.replaced.push(preset.name.clone());
            }
            outcome.presets.push(preset.name.clone());
        }
        Ok(outcome)
    }
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
