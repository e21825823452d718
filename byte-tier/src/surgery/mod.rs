//! The surgery people ask for, on quantized GGUF: directional ablation, LoRA merge,
//! grafting and layer duplication.
//!
//! Grafting ([`copy_tensor`]) and layer duplication ([`duplicate_layers`]) are edits of
//! a rewrite through [`crate::GgufWriter`]; tensors keep their types and bytes.
//! Ablation ([`plan_ablation`]) and LoRA merge ([`plan_lora_merge`]) are value edits
//! planned here as whole-tensor new bytes, each tensor requantized to its own type by
//! the codecs, with a report of what requantizing cost; whoever holds the file (the
//! journal, a live mapping) applies them as one transaction.

mod ablate;
mod graft;
mod layers;
mod lora;
mod rows;

#[cfg(test)]
mod tests;

pub use ablate::{
    AblatedTensor, AblationOptions, AblationPlan, Directions, RESIDUAL_WRITERS, SkippedTensor,
    directions_from_gguf, plan_ablation, plan_ablation_in_shards, read_directions,
};
pub use graft::{
    GraftReport, GraftSource, SetGraftPlan, copy_tensor, copy_tensor_from, copy_tensor_into_set,
    set_output_prefix,
};
pub use layers::{DuplicateReport, duplicate_layers, duplicate_layers_of_set};
pub use lora::{
    LoraMergePlan, LoraTensorReport, merge_label, plan_lora_merge, plan_lora_merge_into_shards,
    plan_lora_merge_weighted,
};
pub use rows::{RequantizationError, RewrittenTensor, can_rewrite};
