//! Memory patches: what to change in a live region, and how.

use std::ops::Range;

use uuid::Uuid;

/// What a patch is for (informational: every kind is applied the same way).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PatchKind {
    /// A change of weight values.
    WeightModification,
    /// A change of a tensor's quantized representation.
    QuantizationChange,
    /// Making a block add nothing to the residual stream.
    LayerBypass,
    /// A change of attention scaling.
    AttentionScale,
    /// A change of bias values.
    BiasAdjustment,
    /// A change of vocabulary data.
    VocabularyPatch,
    /// Anything else.
    Custom,
}

/// Where a patch applies.
#[derive(Clone, Debug, PartialEq)]
pub enum PatchTarget {
    /// Elements of a tensor (whole blocks; the whole tensor when `None`).
    Tensor {
        /// The tensor.
        name: String,
        /// The element range.
        elements: Option<Range<u64>>,
    },
    /// A byte range of the region.
    Raw(Range<u64>),
}

/// A value transform, carried out by byte-tier's codecs: the one transform type of the
/// command line, the admin API, presets and patches, with one validation.
///
/// Serialized as a table with exactly one key (JSON `{"scale": 0.5}`, TOML
/// `{ scale = 0.5 }`): `scale`, `offset`, `clamp = [min, max]`, `zero = true` or
/// `set = [values…]`. Deserializing validates: finite numbers, `min <= max`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "TransformFields", into = "TransformFields")]
#[non_exhaustive]
pub enum ValueTransform {
    /// Multiply by a factor (on block scales alone where the type allows).
    Scale(f32),
    /// Add a constant.
    Offset(f32),
    /// Clamp into `min..=max`.
    Clamp {
        /// Lower bound.
        min: f32,
        /// Upper bound.
        max: f32,
    },
    /// Set to zero.
    Zero,
    /// Set to these values, one per element of the target.
    Set(Vec<f32>),
}

/// The serialized form of a [`ValueTransform`]: one key of several.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TransformFields {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    scale: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    offset: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    clamp: Option<[f32; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    zero: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    set: Option<Vec<f32>>,
}

impl TryFrom<TransformFields> for ValueTransform {
    type Error = String;

    fn try_from(fields: TransformFields) -> Result<ValueTransform, String> {
        let transform = match fields {
            TransformFields {
                scale: Some(f),
                offset: None,
                clamp: None,
                zero: None,
                set: None,
            } => ValueTransform::Scale(f),
            TransformFields {
                scale: None,
                offset: Some(f),
                clamp: None,
                zero: None,
                set: None,
            } => ValueTransform::Offset(f),
            TransformFields {
                scale: None,
                offset: None,
                clamp: Some([min, max]),
                zero: None,
                set: None,
            } => ValueTransform::Clamp { min, max },
            TransformFields {
                scale: None,
                offset: None,
                clamp: None,
                zero: Some(zero),
                set: None,
            } => {
                if !zero {
                    return Err("zero must be true".into());
                }
                ValueTransform::Zero
            }
            TransformFields {
                scale: None,
                offset: None,
                clamp: None,
                zero: None,
                set: Some(values),
            } => ValueTransform::Set(values),
            _ => return Err("give exactly one of scale, offset, clamp, zero = true, set".into()),
        };
        transform.validate()?;
        Ok(transform)
    }
}

impl From<ValueTransform> for TransformFields {
    fn from(transform: ValueTransform) -> TransformFields {
        let mut fields = TransformFields::default();
        match transform {
            ValueTransform::Scale(f) => fields.scale = Some(f),
            ValueTransform::Offset(f) => fields.offset = Some(f),
            ValueTransform::Clamp { min, max } => fields.clamp = Some([min, max]),
            ValueTransform::Zero => fields.zero = Some(true),
            ValueTransform::Set(values) => fields.set = Some(values),
        }
        fields
    }
}

impl ValueTransform {
    /// Checks what can be checked without a tensor: every number finite, `min <= max`.
    /// The codec checks the rest (the number of values to set, scales that overflow).
    pub fn validate(&self) -> Result<(), String> {
        let finite = |v: f32, what: &str| {
            if v.is_finite() {
                Ok(())
            } else {
                Err(format!("{what} {v} is not finite"))
            }
        };
        match self {
            ValueTransform::Scale(f) => finite(*f, "scale"),
            ValueTransform::Offset(f) => finite(*f, "offset"),
            ValueTransform::Clamp { min, max } => {
                finite(*min, "clamp minimum")?;
                finite(*max, "clamp maximum")?;
                if min > max {
                    return Err(format!("clamp minimum exceeds maximum ({min} > {max})"));
                }
                Ok(())
            }
            ValueTransform::Zero => Ok(()),
            ValueTransform::Set(values) => match values.iter().position(|v| !v.is_finite()) {
                Some(i) => Err(format!("value {i} to set ({}) is not finite", values[i])),
                None => Ok(()),
            },
        }
    }

    /// A short description: `scale 0.5`, `clamp -1 1`, `set 4096 values`.
    pub fn describe(&self) -> String {
        match self {
            ValueTransform::Scale(f) => format!("scale {f}"),
            ValueTransform::Offset(f) => format!("offset {f}"),
            ValueTransform::Clamp { min, max } => format!("clamp {min} {max}"),
            ValueTransform::Zero => "zero".into(),
            ValueTransform::Set(values) => format!("set {} values", values.len()),
        }
    }

    /// The codec's form of this transform, borrowing its values.
    pub fn as_codec(&self) -> byte_tier::codec::Transform<'_> {
        use byte_tier::codec::Transform;
        match self {
            ValueTransform::Scale(f) => Transform::Scale(*f),
            ValueTransform::Offset(f) => Transform::Offset(*f),
            ValueTransform::Clamp { min, max } => Transform::Clamp {
                min: *min,
                max: *max,
            },
            ValueTransform::Zero => Transform::Zero,
            ValueTransform::Set(values) => Transform::Set(values),
        }
    }
}

/// What a patch writes.
#[derive(Clone, Debug, PartialEq)]
pub enum Payload {
    /// These bytes, exactly the target's length.
    Bytes(Vec<u8>),
    /// A transform of the target's values.
    Transform(ValueTransform),
}

/// A patch of a live region.
#[derive(Clone, Debug, PartialEq)]
pub struct MemoryPatch {
    /// Its identity.
    pub id: Uuid,
    /// A human name (unique among applied patches).
    pub name: String,
    /// What it is for.
    pub kind: PatchKind,
    /// Where it applies.
    pub target: PatchTarget,
    /// What it writes.
    pub payload: Payload,
    /// Higher wins an overlap with an applied patch; equal or lower is refused.
    pub priority: i32,
    /// A disabled patch is refused.
    pub enabled: bool,
    /// Keep a full copy of the target range while applied, even when a smaller delta
    /// would do (for callers that want the before-image at hand).
    pub snapshot: bool,
    /// When a temporary patch is to be reverted. The journal records it, so that whoever
    /// attaches after a restart can revert it on time; the model itself keeps no timer.
    pub expires_at: Option<std::time::SystemTime>,
    /// Importance weights for a value transform that requantizes (an importance
    /// matrix's entry for the target tensor: one weight per column, per expert), applied
    /// as `llama-quantize --imatrix` applies them. Ignored by byte payloads and by
    /// transforms that do not requantize.
    pub importance: Option<std::sync::Arc<[f32]>>,
}

impl MemoryPatch {
    /// A weight-modification patch with a fresh id, priority 0, enabled.
    pub fn new(name: impl Into<String>, target: PatchTarget, payload: Payload) -> MemoryPatch {
        MemoryPatch {
            id: Uuid::new_v4(),
            name: name.into(),
            kind: PatchKind::WeightModification,
            target,
            payload,
            priority: 0,
            enabled: true,
            snapshot: false,
            expires_at: None,
            importance: None,
        }
    }

    /// The same patch, requantizing with these importance weights (see
    /// [`MemoryPatch::importance`]).
    pub fn with_importance(mut self, weights: impl Into<std::sync::Arc<[f32]>>) -> MemoryPatch {
        self.importance = Some(weights.into());
        self
    }

    /// The same patch with another priority.
    pub fn with_priority(mut self, priority: i32) -> MemoryPatch {
        self.priority = priority;
        self
    }

    /// The same patch, temporary: to be reverted at `at`.
    pub fn with_expiry(mut self, at: std::time::SystemTime) -> MemoryPatch {
        self.expires_at = Some(at);
        self
    }

    /// The same patch with another kind.
    pub fn with_kind(mut self, kind: PatchKind) -> MemoryPatch {
        self.kind = kind;
        self
    }

    /// A transform of a whole tensor.
    pub fn transform(
        name: impl Into<String>,
        tensor: impl Into<String>,
        transform: ValueTransform,
    ) -> MemoryPatch {
        MemoryPatch::new(
            name,
            PatchTarget::Tensor {
                name: tensor.into(),
                elements: None,
            },
            Payload::Transform(transform),
        )
    }
}
