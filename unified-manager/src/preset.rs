//! Presets: named, versioned TOML documents of memory patches, byte patches and server
//! rules, kept in the configuration directory.
//!
//! ```toml
//! name = "calm"
//! version = 2
//! description = "quieter output norm, a token cap"
//!
//! [[memory_patch]]
//! name = "halve-output-norm"
//! tensor = "output_norm.weight"
//! transform = { scale = 0.5 }
//!
//! [[server_rule]]
//! name = "cap"
//! action = { type = "clamp", key = "max_tokens", max = 256.0 }
//! ```

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};

use byte_tier::named::BytePatch;
use byte_tier::plan::FileStamp;
use byte_tier::split::transaction::{ShardWrites, revert_set_transaction, run_set_transaction};
use memory_tier::{MemoryPatch, PatchPlan, PatchTarget, Payload, ValueTransform};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::manager::{Manager, ModelId, Patch, Receipt};
use crate::report::Tier;
use crate::safety::{Repair, ServerDefaults};
use crate::server::Rule;

/// The transform of a memory patch in a preset: memory-tier's one transform type
/// (`transform = { scale = 0.5 }`), validated as it is read.
pub type TransformSpec = ValueTransform;

/// A memory patch in a preset: a transform of a tensor's values (or of an element range).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryPatchSpec {
    /// Its name (unique in the preset).
    pub name: String,
    /// The tensor.
    pub tensor: String,
    /// Elements `[start, end)` in whole blocks; the whole tensor when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elements: Option<[u64; 2]>,
    /// What it does.
    pub transform: TransformSpec,
    /// Higher wins an overlap.
    #[serde(default)]
    pub priority: i32,
}

impl MemoryPatchSpec {
    /// The memory-tier patch.
    pub fn to_patch(&self) -> std::result::Result<MemoryPatch, String> {
        self.transform.validate()?;
        let transform = self.transform.clone();
        let elements = self.elements.map(|[start, end]| start..end);
        Ok(MemoryPatch::new(
            self.name.clone(),
            PatchTarget::Tensor {
                name: self.tensor.clone(),
                elements,
            },
            Payload::Transform(transform),
        )
        .with_priority(self.priority))
    }
}

/// A preset.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    /// Its name: letters, digits, `.`, `_` and `-`.
    pub name: String,
    /// Its version, raised by its author on each change.
    pub version: u32,
    /// What it is for.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Value transforms of the live model.
    #[serde(
        default,
        rename = "memory_patch",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub memory_patches: Vec<MemoryPatchSpec>,
    /// Named byte patches.
    #[serde(default, rename = "byte_patch", skip_serializing_if = "Vec::is_empty")]
    pub byte_patches: Vec<BytePatch>,
    /// Rules for the attached server.
    #[serde(default, rename = "server_rule", skip_serializing_if = "Vec::is_empty")]
    pub server_rules: Vec<Rule>,
}

/// Checks a name used as a file name.
pub(crate) fn check_name(name: &str) -> std::result::Result<(), String> {
    if name.is_empty()
        || name.len() > 100
        || name.starts_with('.')
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    {
        return Err(format!(
            "{name:?} is not a valid name (1-100 letters, digits, '.', '_', '-'; not starting with '.')"
        ));
    }
    Ok(())
}

impl Preset {
    /// Parses a preset document; errors name the field at fault.
    pub fn from_toml(document: &str, text: &str) -> Result<Preset> {
        let preset: Preset = parse_toml(document, text)?;
        preset.validate(document)?;
        Ok(preset)
    }

    /// The preset as a TOML document.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string(self).map_err(|e| Error::invalid(&self.name, "", e.to_string()))
    }

    /// Checks what parsing cannot: names, transforms, rules, uniqueness.
    pub fn validate(&self, document: &str) -> Result<()> {
        let bad = |field: String, message: String| Err(Error::invalid(document, field, message));
        if let Err(message) = check_name(&self.name) {
            return bad("name".into(), message);
        }
        let mut names = HashSet::new();
        for (i, spec) in self.memory_patches.iter().enumerate() {
            if let Err(message) = spec.transform.validate() {
                return bad(format!("memory_patch[{i}].transform"), message);
            }
            if let Some([start, end]) = spec.elements
                && start >= end
            {
                return bad(
                    format!("memory_patch[{i}].elements"),
                    format!("[{start}, {end}] is empty or reversed"),
                );
            }
            if spec.name.is_empty() || !names.insert(spec.name.as_str()) {
                return bad(
                    format!("memory_patch[{i}].name"),
                    format!("{:?} is empty or used twice", spec.name),
                );
            }
        }
        for (i, patch) in self.byte_patches.iter().enumerate() {
            if patch.name.is_empty() || !names.insert(patch.name.as_str()) {
                return bad(
                    format!("byte_patch[{i}].name"),
                    format!("{:?} is empty or used twice", patch.name),
                );
            }
        }
        let mut rules = HashSet::new();
        for (i, rule) in self.server_rules.iter().enumerate() {
            if let Err(error) = rule.validate() {
                return bad(format!("server_rule[{i}]"), error.to_string());
            }
            if !rules.insert(rule.name.as_str()) {
                return bad(
                    format!("server_rule[{i}].name"),
                    format!("{:?} is used twice", rule.name),
                );
            }
        }
        Ok(())
    }

    /// The preset's patches, for [`Manager::apply_all`].
    pub fn patches(&self) -> Result<Vec<Patch>> {
        let mut patches = Vec::new();
        for (i, spec) in self.memory_patches.iter().enumerate() {
            let patch = spec.to_patch().map_err(|message| {
                Error::invalid(&self.name, format!("memory_patch[{i}].transform"), message)
            })?;
            patches.push(Patch::Memory(patch));
        }
        patches.extend(self.byte_patches.iter().cloned().map(Patch::Byte));
        patches.extend(
            self.server_rules
                .iter()
                .cloned()
                .map(|r| Patch::Rule(Box::new(r))),
        );
        Ok(patches)
    }
}

/// Parses TOML into `T`, naming the field at fault in errors.
pub(crate) fn parse_toml<T: serde::de::DeserializeOwned>(document: &str, text: &str) -> Result<T> {
    let deserializer =
        toml::Deserializer::parse(text).map_err(|e| Error::invalid(document, "", e.to_string()))?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        Error::invalid(
            document,
            if field == "." { String::new() } else { field },
            e.into_inner().to_string(),
        )
    })
}

/// Defaults the commands use.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// The admin API of a running `hotpatch serve`, for commands given `--server`
    /// without a URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server_url: Option<String>,
    /// The file holding its bearer token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_token_file: Option<PathBuf>,
    /// Defaults of the safety pipeline.
    #[serde(default)]
    pub safety: SafetySettings,
}

/// Defaults of the safety pipeline.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SafetySettings {
    /// Repair non-finite values this way unless told otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repair: Option<Repair>,
    /// Clamp outliers at this many standard deviations unless told otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_sigmas: Option<f32>,
    /// Server rules to add.
    #[serde(default)]
    pub server: ServerDefaults,
}

impl Settings {
    /// Checks values parsing cannot.
    pub fn validate(&self, document: &str) -> Result<()> {
        if let Some(k) = self.safety.outlier_sigmas
            && !(k.is_finite() && k > 0.0)
        {
            return Err(Error::invalid(
                document,
                "safety.outlier_sigmas",
                format!("{k} is not a positive number"),
            ));
        }
        if self.safety.server.max_tokens == 0 {
            return Err(Error::invalid(
                document,
                "safety.server.max_tokens",
                "must be at least 1",
            ));
        }
        Ok(())
    }
}

/// The configuration directory: `presets/NAME.toml` and `settings.toml`.
#[derive(Clone, Debug)]
pub struct ConfigDir {
    dir: PathBuf,
}

impl ConfigDir {
    /// A configuration directory at `dir` (created when first written to).
    pub fn new(dir: impl Into<PathBuf>) -> ConfigDir {
        ConfigDir { dir: dir.into() }
    }

    /// `$HOTPATCH_CONFIG_DIR`, else `$XDG_CONFIG_HOME/hotpatch`, else
    /// `~/.config/hotpatch`.
    pub fn default_location() -> Result<ConfigDir> {
        let env = |name: &str| {
            std::env::var_os(name)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(dir) = env("HOTPATCH_CONFIG_DIR") {
            return Ok(ConfigDir::new(dir));
        }
        if let Some(base) = env("XDG_CONFIG_HOME") {
            return Ok(ConfigDir::new(base.join("hotpatch")));
        }
        let home = env("HOME").ok_or_else(|| {
            Error::Refused(
                "neither HOTPATCH_CONFIG_DIR, XDG_CONFIG_HOME nor HOME is set".to_owned(),
            )
        })?;
        Ok(ConfigDir::new(home.join(".config").join("hotpatch")))
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    fn presets_dir(&self) -> PathBuf {
        self.dir.join("presets")
    }

    /// The file that holds (or would hold) the preset `name`.
    pub fn preset_file(&self, name: &str) -> Result<PathBuf> {
        self.preset_path(name)
    }

    /// The settings file.
    pub fn settings_path(&self) -> PathBuf {
        self.dir.join("settings.toml")
    }

    /// `settings` as the settings file holds them (validated first).
    pub fn settings_text(&self, settings: &Settings) -> Result<String> {
        settings.validate("settings")?;
        toml::to_string(settings).map_err(|e| Error::invalid("settings", "", e.to_string()))
    }

    fn preset_path(&self, name: &str) -> Result<PathBuf> {
        check_name(name).map_err(|message| Error::invalid(name, "name", message))?;
        Ok(self.presets_dir().join(format!("{name}.toml")))
    }

    /// Saves a preset (validated first), replacing one of the same name; returns its file.
    pub fn save_preset(&self, preset: &Preset) -> Result<PathBuf> {
        preset.validate(&preset.name)?;
        let path = self.preset_path(&preset.name)?;
        write_atomic(&path, preset.to_toml()?.as_bytes())?;
        Ok(path)
    }

    /// Loads the preset `name`.
    pub fn load_preset(&self, name: &str) -> Result<Preset> {
        let path = self.preset_path(name)?;
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(Error::NoSuchPreset(name.to_owned()));
            }
            Err(e) => return Err(Error::io("read", path, e)),
        };
        let preset = Preset::from_toml(&path.display().to_string(), &text)?;
        if preset.name != name {
            return Err(Error::invalid(
                path.display().to_string(),
                "name",
                format!("{:?} differs from the file's name {name:?}", preset.name),
            ));
        }
        Ok(preset)
    }

    /// Every preset, by name.
    pub fn presets(&self) -> Result<Vec<Preset>> {
        let dir = self.presets_dir();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list", dir, e)),
        };
        let mut names = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list", &dir, e))?;
            let file = entry.file_name();
            if let Some(name) = file.to_str().and_then(|f| f.strip_suffix(".toml"))
                && check_name(name).is_ok()
            {
                names.push(name.to_owned());
            }
        }
        names.sort();
        names.iter().map(|n| self.load_preset(n)).collect()
    }

    /// Deletes the preset `name`.
    pub fn delete_preset(&self, name: &str) -> Result<()> {
        let path = self.preset_path(name)?;
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(Error::NoSuchPreset(name.to_owned()))
            }
            Err(e) => Err(Error::io("remove", path, e)),
        }
    }

    /// The settings (defaults when there is no settings file).
    pub fn settings(&self) -> Result<Settings> {
        let path = self.dir.join("settings.toml");
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let document = path.display().to_string();
                let settings: Settings = parse_toml(&document, &text)?;
                settings.validate(&document)?;
                Ok(settings)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Settings::default()),
            Err(e) => Err(Error::io("read", path, e)),
        }
    }

    /// Saves the settings.
    pub fn save_settings(&self, settings: &Settings) -> Result<()> {
        let text = self.settings_text(settings)?;
        write_atomic(&self.settings_path(), text.as_bytes())
    }
}

/// Writes a file through a temporary file in its directory, fsync and rename.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = byte_tier::parent_dir(path);
    std::fs::create_dir_all(dir).map_err(|e| Error::io("create", dir, e))?;
    let mut temp = tempfile::NamedTempFile::new_in(dir)
        .map_err(|e| Error::io("create a temporary file in", dir, e))?;
    temp.write_all(bytes)
        .map_err(|e| Error::io("write", path, e))?;
    temp.as_file()
        .sync_all()
        .map_err(|e| Error::io("sync", path, e))?;
    temp.persist(path)
        .map_err(|e| Error::io("rename into", path, e.error))?;
    byte_tier::sync_dir(dir)?;
    Ok(())
}

impl Manager {
    /// Plans `preset` on model `id` as one unit ([`Manager::plan_all`]), writing nothing.
    pub fn plan_preset(&self, id: ModelId, preset: &Preset) -> Result<crate::manager::UnitPlan> {
        self.plan_preset_weighted(id, preset, None)
    }

    /// [`Manager::plan_preset`] with an importance matrix (checked against the model
    /// first): a memory patch whose transform requantizes a tensor the matrix names is
    /// requantized with that tensor's weights, as `hotpatch patch --imatrix` does; a
    /// tensor the matrix does not name is requantized without weights, as llama-quantize
    /// does.
    pub fn plan_preset_weighted(
        &self,
        id: ModelId,
        preset: &Preset,
        imatrix: Option<&byte_tier::imatrix::ImportanceMatrix>,
    ) -> Result<crate::manager::UnitPlan> {
        preset.validate(&preset.name)?;
        let mut patches = preset.patches()?;
        if let Some(matrix) = imatrix {
            let live = self.model(id)?;
            {
                let view = live.read();
                let gguf = byte_tier::Gguf::parse(view.bytes())?;
                matrix.check_model(&gguf)?;
            }
            for patch in &mut patches {
                let Patch::Memory(memory) = patch else {
                    continue;
                };
                let PatchTarget::Tensor { name, .. } = &memory.target else {
                    continue;
                };
                if let Some(weights) = matrix.weights_for(live.tensor(name)?)? {
                    memory.importance = Some(weights.into());
                }
            }
        }
        self.plan_all(id, patches)
    }

    /// Applies a preset to the model attached as `id` as one unit (memory and byte
    /// patches in one transaction, then the server rules; all or none).
    pub fn apply_preset(&self, id: ModelId, preset: &Preset) -> Result<Vec<Receipt>> {
        preset.validate(&preset.name)?;
        let receipts = self.apply_all(id, preset.patches()?)?;
        self.record(format!(
            "applied preset {} v{}",
            preset.name, preset.version
        ));
        Ok(receipts)
    }
}

/// One shard's part of a [`SetPresetPlan`]: the patches that land in it, planned on it.
#[derive(Debug, Serialize)]
pub struct SetPresetPart {
    /// The shard.
    pub shard: PathBuf,
    /// Its patches' transaction, planned on the shard.
    pub plan: PatchPlan,
}

/// A preset planned over the shards of a set by [`Manager::plan_preset_of_set`]: each
/// memory or byte patch planned on the shard that holds its tensor, all of them to be
/// written as one set transaction (all shards or none, recovered as a unit), then the
/// server rules.
#[derive(Debug, Serialize)]
pub struct SetPresetPlan {
    /// `"in_place_set"`.
    pub kind: &'static str,
    /// Every shard of the set, in order.
    pub shards: Vec<PathBuf>,
    /// The set transaction's name.
    pub name: String,
    /// The shards written, each with its plan.
    pub parts: Vec<SetPresetPart>,
    /// Bytes written, over all shards.
    pub bytes: u64,
    /// The server rules added after the write, by name.
    pub rules: Vec<String>,
    /// What the plan was made from: each shard it writes, with its header and the
    /// ranges it writes.
    pub stamps: Vec<FileStamp>,
    #[serde(skip)]
    writes: Vec<ShardWrites>,
    #[serde(skip)]
    rule_data: Vec<Rule>,
    #[serde(skip)]
    order: Vec<(Tier, String)>,
}

impl SetPresetPlan {
    /// What applying would give back, before the set transaction exists.
    pub fn receipts(&self) -> Vec<Receipt> {
        set_receipts(&self.order)
    }

    /// Binds the plan to the manager that applies it (for its server), as a
    /// `byte_tier::plan::Plan`.
    pub fn on(self, manager: &Manager) -> BoundSetPresetPlan<'_> {
        BoundSetPresetPlan {
            manager,
            plan: self,
        }
    }
}

fn set_receipts(order: &[(Tier, String)]) -> Vec<Receipt> {
    order
        .iter()
        .map(|(tier, name)| Receipt {
            tier: *tier,
            name: name.clone(),
            memory_patch: None,
            journal_transaction: None,
        })
        .collect()
}

/// What applying a [`SetPresetPlan`] did.
#[derive(Debug)]
pub struct SetPresetApplied {
    /// One receipt per patch and rule, in the preset's order.
    pub receipts: Vec<Receipt>,
    /// The set journal's transaction (`hotpatch revert --set SHARD N`), `None` when no
    /// byte changed.
    pub set_transaction: Option<u64>,
    /// Bytes written.
    pub bytes: u64,
}

/// A [`SetPresetPlan`] with its manager: reported as the plan, applied by
/// [`Manager::apply_preset_of_set`].
#[derive(Debug, Serialize)]
pub struct BoundSetPresetPlan<'a> {
    #[serde(skip)]
    manager: &'a Manager,
    #[serde(flatten)]
    plan: SetPresetPlan,
}

impl byte_tier::plan::Plan for BoundSetPresetPlan<'_> {
    type Applied = SetPresetApplied;
    type Error = Error;

    fn is_noop(&self) -> bool {
        self.plan.writes.is_empty() && self.plan.rules.is_empty()
    }

    fn apply(self) -> Result<SetPresetApplied> {
        self.manager.apply_preset_of_set(self.plan)
    }
}

/// The tensor a patch of a preset addresses, which names the shard it goes to; patches
/// addressed by absolute offsets name no shard of a set and are refused.
fn tensor_of(patch: &Patch) -> Result<Option<&str>> {
    let refuse = |name: &str| {
        Err(Error::Refused(format!(
            "patch {name:?} addresses absolute offsets, which name no shard of a set: give \
             it a tensor target, or apply it to one shard file with `hotpatch patch`"
        )))
    };
    match patch {
        Patch::Memory(p) => match &p.target {
            PatchTarget::Tensor { name, .. } => Ok(Some(name)),
            PatchTarget::Raw(_) => refuse(&p.name),
        },
        Patch::Byte(p) => match &p.target {
            byte_tier::named::PatchTarget::Tensor { tensor, .. } => Ok(Some(tensor)),
            byte_tier::named::PatchTarget::Offset { .. } => refuse(&p.name),
        },
        Patch::Rule(_) => Ok(None),
    }
}

impl Manager {
    /// [`Manager::plan_preset_weighted`] over the shard set `any_shard` belongs to: each
    /// shard is attached privately (nothing written, no journal opened), each patch is
    /// planned on the shard that holds its tensor, and the writes make one set
    /// transaction. A patch that lies over a live patch of its shard is refused (revert
    /// that one first); so is one addressed by absolute offsets.
    pub fn plan_preset_of_set(
        &self,
        any_shard: &Path,
        preset: &Preset,
        imatrix: Option<&byte_tier::imatrix::ImportanceMatrix>,
    ) -> Result<SetPresetPlan> {
        preset.validate(&preset.name)?;
        let set = byte_tier::split::ShardSet::open(any_shard)?;
        let parsed = set.parse_all()?;
        if let Some(matrix) = imatrix {
            matrix.check_shards(&parsed)?;
        }
        let mut per_shard: Vec<Vec<Patch>> = (0..parsed.len()).map(|_| Vec::new()).collect();
        let mut order = Vec::new();
        let mut rules = Vec::new();
        for patch in preset.patches()? {
            order.push((patch.tier(), patch.name().to_owned()));
            let Some(tensor) = tensor_of(&patch)?.map(str::to_owned) else {
                if let Patch::Rule(rule) = patch {
                    rules.push(*rule);
                }
                continue;
            };
            let Some(index) = parsed.iter().position(|g| g.tensor(&tensor).is_some()) else {
                return Err(Error::Refused(format!(
                    "patch {:?}: no shard of the set of {} holds tensor {tensor:?}",
                    patch.name(),
                    any_shard.display()
                )));
            };
            let mut patch = patch;
            if let (Some(matrix), Patch::Memory(memory)) = (imatrix, &mut patch)
                && let Some(info) = parsed[index].tensor(&tensor)
                && let Some(weights) = matrix.weights_for(info)?
            {
                memory.importance = Some(weights.into());
            }
            per_shard[index].push(patch);
        }
        self.rule_server_for(&rules)?;
        let mut parts = Vec::new();
        let mut writes = Vec::new();
        let mut stamps = Vec::new();
        for ((file, gguf), patches) in set.files().iter().zip(&parsed).zip(per_shard) {
            if patches.is_empty() {
                continue;
            }
            let live =
                memory_tier::LiveModel::attach(file.path(), memory_tier::AttachMode::Private)?;
            let memory = crate::manager::memory_patches(patches, live.read().bytes())?;
            let plan = live.plan_transaction(memory)?;
            let Some(shard_writes) = plan.byte_writes() else {
                return Err(Error::Refused(format!(
                    "a patch of preset {} lies over a patch applied to {}: revert that one \
                     first (`hotpatch revert`)",
                    preset.name,
                    file.path().display()
                )));
            };
            let ranges = std::iter::once(0..gguf.data_offset()).chain(
                shard_writes
                    .iter()
                    .map(|w| w.offset..w.offset + w.bytes.len() as u64),
            );
            stamps.push(FileStamp::take(file.path(), file.bytes(), ranges)?);
            writes.push(ShardWrites {
                shard: file.path().to_owned(),
                writes: shard_writes,
                reverts: None,
            });
            parts.push(SetPresetPart {
                shard: file.path().to_owned(),
                plan,
            });
        }
        Ok(SetPresetPlan {
            kind: "in_place_set",
            shards: set.files().iter().map(|f| f.path().to_owned()).collect(),
            name: format!("preset {} v{}", preset.name, preset.version),
            bytes: parts.iter().map(|p| p.plan.bytes).sum(),
            parts,
            rules: rules.iter().map(|r| r.name.clone()).collect(),
            stamps,
            writes,
            rule_data: rules,
            order,
        })
    }

    /// Applies a [`SetPresetPlan`] as it was made (refused when a shard changed since):
    /// the writes as one set transaction, then the server rules; if a rule is refused,
    /// the set transaction is reverted.
    pub fn apply_preset_of_set(&self, plan: SetPresetPlan) -> Result<SetPresetApplied> {
        let server = self.rule_server_for(&plan.rule_data)?;
        for (stamp, part) in plan.stamps.iter().zip(&plan.writes) {
            let map = byte_tier::MappedFile::open(&part.shard)?;
            stamp.check(map.bytes())?;
        }
        let first = plan.shards.first().cloned().unwrap_or_default();
        let set_transaction = if plan.writes.is_empty() {
            None
        } else {
            run_set_transaction(&first, &plan.name, None, plan.writes)?.transaction
        };
        if let Some(server) = server
            && let Err(error) = self.add_rules(server.as_ref(), plan.rule_data)
        {
            if let Some(id) = set_transaction
                && let Err(e) = revert_set_transaction(&first, id)
            {
                return Err(Error::RollbackFailed {
                    error: Box::new(error),
                    rollback: vec![format!("reverting set transaction {id}: {e}")],
                });
            }
            return Err(error);
        }
        self.record(format!(
            "applied {} to the set of {}",
            plan.name,
            first.display()
        ));
        Ok(SetPresetApplied {
            receipts: set_receipts(&plan.order),
            set_transaction,
            bytes: plan.bytes,
        })
    }
}
