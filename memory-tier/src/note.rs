//! What a live model writes in the journal beside the bytes of each transaction: which
//! patches it applied (identity, name, priority, target, transform, expiry), which one
//! it reverted, and the undo bytes it handed from a reverted patch to the patch over it.
//! Attaching again reads these notes to list the applied patches as they were.

use serde::{Deserialize, Serialize};

use crate::patch::{MemoryPatch, PatchKind, PatchTarget, Payload, ValueTransform};

/// The marker of a note written by a live model.
pub(crate) const FORMAT: &str = "hotpatch-live-1";

/// The note of one journal transaction.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct LiveNote {
    /// Always [`FORMAT`].
    pub format: String,
    /// The patches this transaction applied.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub patches: Vec<NotedPatch>,
    /// The patch this transaction reverted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverts: Option<String>,
    /// Undo bytes handed to the patches over the reverted one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub amends: Vec<Amend>,
}

impl LiveNote {
    /// The note as stored, or `None` when the bytes are not a live model's note.
    pub fn parse(bytes: &[u8]) -> Option<LiveNote> {
        let note: LiveNote = serde_json::from_slice(bytes).ok()?;
        (note.format == FORMAT).then_some(note)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// One applied patch, as the journal remembers it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NotedPatch {
    pub id: String,
    pub name: String,
    pub priority: i32,
    pub kind: String,
    /// The tensor, for a tensor target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor: Option<String>,
    /// The element range of a tensor target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elements: Option<[u64; 2]>,
    /// The absolute byte range the patch owns.
    pub range: [u64; 2],
    /// The transform, when it was one that a few numbers describe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transform: Option<NotedTransform>,
    /// When a temporary patch is to be reverted (ms since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
}

/// A transform that a few numbers describe.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum NotedTransform {
    Scale(f32),
    Offset(f32),
    Clamp([f32; 2]),
    Zero,
}

/// Undo bytes handed from a reverted patch to the patch over it: when that patch is
/// reverted, these are the bytes it restores at `offset`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Amend {
    pub patch: String,
    pub offset: u64,
    /// The bytes, in hex.
    pub bytes: String,
}

fn kind_name(kind: PatchKind) -> &'static str {
    match kind {
        PatchKind::WeightModification => "weight_modification",
        PatchKind::QuantizationChange => "quantization_change",
        PatchKind::LayerBypass => "layer_bypass",
        PatchKind::AttentionScale => "attention_scale",
        PatchKind::BiasAdjustment => "bias_adjustment",
        PatchKind::VocabularyPatch => "vocabulary_patch",
        PatchKind::Custom => "custom",
    }
}

fn kind_from_name(name: &str) -> PatchKind {
    match name {
        "weight_modification" => PatchKind::WeightModification,
        "quantization_change" => PatchKind::QuantizationChange,
        "layer_bypass" => PatchKind::LayerBypass,
        "attention_scale" => PatchKind::AttentionScale,
        "bias_adjustment" => PatchKind::BiasAdjustment,
        "vocabulary_patch" => PatchKind::VocabularyPatch,
        _ => PatchKind::Custom,
    }
}

impl NotedPatch {
    pub fn from_patch(patch: &MemoryPatch, range: &std::ops::Range<u64>) -> NotedPatch {
        let (tensor, elements) = match &patch.target {
            PatchTarget::Tensor { name, elements } => (
                Some(name.clone()),
                elements.as_ref().map(|r| [r.start, r.end]),
            ),
            PatchTarget::Raw(_) => (None, None),
        };
        let transform = match &patch.payload {
            Payload::Transform(ValueTransform::Scale(f)) => Some(NotedTransform::Scale(*f)),
            Payload::Transform(ValueTransform::Offset(f)) => Some(NotedTransform::Offset(*f)),
            Payload::Transform(ValueTransform::Clamp { min, max }) => {
                Some(NotedTransform::Clamp([*min, *max]))
            }
            Payload::Transform(ValueTransform::Zero) => Some(NotedTransform::Zero),
            _ => None,
        };
        NotedPatch {
            id: patch.id.to_string(),
            name: patch.name.clone(),
            priority: patch.priority,
            kind: kind_name(patch.kind).to_owned(),
            tensor,
            elements,
            range: [range.start, range.end],
            transform,
            expires_at_ms: patch.expires_at.map(crate::live::unix_ms),
        }
    }

    /// The patch again. A transform that the note could not describe (values set one by
    /// one, raw bytes) comes back as the bytes it left in `written`.
    pub fn to_patch(&self, written: Vec<u8>) -> Option<MemoryPatch> {
        let id = uuid::Uuid::parse_str(&self.id).ok()?;
        let target = match &self.tensor {
            Some(name) => PatchTarget::Tensor {
                name: name.clone(),
                elements: self.elements.map(|[a, b]| a..b),
            },
            None => PatchTarget::Raw(self.range[0]..self.range[1]),
        };
        let payload = match self.transform {
            Some(NotedTransform::Scale(f)) => Payload::Transform(ValueTransform::Scale(f)),
            Some(NotedTransform::Offset(f)) => Payload::Transform(ValueTransform::Offset(f)),
            Some(NotedTransform::Clamp([min, max])) => {
                Payload::Transform(ValueTransform::Clamp { min, max })
            }
            Some(NotedTransform::Zero) => Payload::Transform(ValueTransform::Zero),
            None => Payload::Bytes(written),
        };
        let mut patch = MemoryPatch::new(self.name.clone(), target, payload)
            .with_priority(self.priority)
            .with_kind(kind_from_name(&self.kind));
        patch.id = id;
        patch.expires_at = self
            .expires_at_ms
            .map(|ms| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms));
        Some(patch)
    }
}

/// Bytes as lowercase hex.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    byte_tier::ops::to_hex(bytes)
}

/// Hex back to bytes, or `None` when it is not hex.
pub(crate) fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}
