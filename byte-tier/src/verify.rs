//! Integrity: per-tensor SHA-256 manifests in the form gguf-py's `gguf-hash` prints, so
//! the two can be compared line for line.

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::gguf::Gguf;
use crate::ops::to_hex;

/// Tensors gguf-hash leaves out of its hashes.
const SKIPPED_SUFFIXES: [&str; 3] = [
    ".attention.masked_bias",
    ".attention.bias",
    ".rotary_emb.inv_freq",
];

/// The SHA-256 of one tensor's data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDigest {
    /// The tensor.
    pub name: String,
    /// SHA-256 of its data.
    pub sha256: [u8; 32],
}

/// A file's digests: one per tensor, and one of all tensor data in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Manifest {
    /// Per tensor, in file order.
    pub tensors: Vec<TensorDigest>,
    /// Of all hashed tensors' data, in order.
    pub whole: [u8; 32],
}

impl Manifest {
    /// Hashes every tensor of `gguf` (in parallel).
    pub fn of(gguf: &Gguf<'_>) -> Manifest {
        Manifest::of_set(std::slice::from_ref(gguf))
    }

    /// Hashes every tensor of a shard set, shard after shard: one manifest for the
    /// whole model, whose last digest covers all tensor data in set order.
    pub fn of_set(shards: &[Gguf<'_>]) -> Manifest {
        let hashed: Vec<_> = shards
            .iter()
            .flat_map(|gguf| gguf.tensors().iter().map(move |t| (gguf, t)))
            .filter(|(_, t)| !SKIPPED_SUFFIXES.iter().any(|s| t.name.ends_with(s)))
            .collect();
        let tensors = hashed
            .par_iter()
            .map(|(gguf, t)| TensorDigest {
                name: t.name.clone(),
                sha256: Sha256::digest(gguf.tensor_data(t)).into(),
            })
            .collect();
        let mut whole = Sha256::new();
        for (gguf, t) in &hashed {
            whole.update(gguf.tensor_data(t));
        }
        Manifest {
            tensors,
            whole: whole.finalize().into(),
        }
    }

    /// The manifest as gguf-hash prints it: `sha256    HEX  FILE:TENSOR` per tensor,
    /// then `sha256    HEX  FILE` for the whole.
    pub fn to_text(&self, filename: &str) -> String {
        let mut out = String::new();
        for t in &self.tensors {
            out.push_str(&format!(
                "sha256    {}  {filename}:{}\n",
                to_hex(&t.sha256),
                t.name
            ));
        }
        out.push_str(&format!("sha256    {}  {filename}\n", to_hex(&self.whole)));
        out
    }

    /// Compares with a manifest text (ours or gguf-hash's; other algorithms' lines are
    /// ignored).
    pub fn check(&self, text: &str) -> Result<ManifestCheck> {
        let mut expected: Vec<(String, String)> = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next()) {
                (Some("sha256"), Some(hex)) => {
                    let rest = line
                        .split_once(hex)
                        .map(|(_, r)| r.trim_start().to_owned())
                        .unwrap_or_default();
                    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                        return Err(Error::InvalidManifest {
                            line: number + 1,
                            reason: "not a SHA-256 digest".into(),
                        });
                    }
                    expected.push((rest, hex.to_ascii_lowercase()));
                }
                (None, _) | (Some("sha1" | "uuid"), _) => {}
                _ => {
                    return Err(Error::InvalidManifest {
                        line: number + 1,
                        reason: "expected `ALGORITHM  DIGEST  NAME`".into(),
                    });
                }
            }
        }
        let mut check = ManifestCheck::default();
        let mut seen = vec![false; self.tensors.len()];
        for (label, hex) in &expected {
            let found = self
                .tensors
                .iter()
                .position(|t| label.ends_with(&format!(":{}", t.name)));
            match found {
                Some(i) => {
                    seen[i] = true;
                    if to_hex(&self.tensors[i].sha256) == *hex {
                        check.matched += 1;
                    } else {
                        check.mismatched.push(self.tensors[i].name.clone());
                    }
                }
                None if label.contains(':') => check.missing.push(label.clone()),
                None => check.whole_matches = Some(to_hex(&self.whole) == *hex),
            }
        }
        check.unlisted = self
            .tensors
            .iter()
            .zip(&seen)
            .filter(|(_, seen)| !**seen)
            .map(|(t, _)| t.name.clone())
            .collect();
        Ok(check)
    }
}

/// The result of comparing a file with a manifest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ManifestCheck {
    /// Tensors whose digest matches.
    pub matched: usize,
    /// Tensors whose digest differs.
    pub mismatched: Vec<String>,
    /// Manifest entries naming no tensor of the file.
    pub missing: Vec<String>,
    /// Tensors of the file the manifest does not list.
    pub unlisted: Vec<String>,
    /// Whether the whole-file digest matches, when the manifest has one.
    pub whole_matches: Option<bool>,
}

impl ManifestCheck {
    /// Whether everything listed matches and nothing is missing or unlisted.
    pub fn is_ok(&self) -> bool {
        self.mismatched.is_empty()
            && self.missing.is_empty()
            && self.unlisted.is_empty()
            && self.whole_matches != Some(false)
    }
}
