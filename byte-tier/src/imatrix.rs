//! Importance matrices as llama-imatrix writes them, turned into the per-column weights
//! that llama-quantize hands to ggml's quantizers.
//!
//! Two formats:
//! - GGUF (llama-imatrix's default): for each weight tensor `NAME`, an F32 tensor
//!   `NAME.in_sum2` of `ne0 * n_mat` sums of squared activations and an F32 tensor
//!   `NAME.counts` of `n_mat` counts (one per expert; `n_mat` is 1 for a 2-D weight),
//!   optionally `NAME.in_sum`; metadata `imatrix.datasets`, `imatrix.chunk_count` and
//!   `imatrix.chunk_size`, which llama-quantize requires. The weight of column `i` of
//!   expert `j` is `in_sum2[j * ne0 + i] / count[j]` (the count rounded to an integer
//!   first), or 1 where the count is zero.
//! - legacy `.dat`: little-endian `i32` entry count, then per entry an `i32` name
//!   length, the name, an `i32` call count `ncall`, an `i32` value count and that many
//!   `f32`s (already averaged and multiplied by `ncall`); optionally an `i32` chunk
//!   count, an `i32` length and the dataset's name. The weight is `value / ncall`, or
//!   the value itself where `ncall` is zero.
//!
//! A file is GGUF when it starts with the GGUF magic, legacy otherwise. Every count and
//! length is checked against the bytes left before anything is allocated from it;
//! truncation, trailing garbage inside the optional trailer, counts that are negative,
//! not finite or do not divide the sums, non-finite weights (llama-quantize refuses
//! those too) and duplicate names are [`Error::BadImatrix`], with the offset.
//!
//! [`ImportanceMatrix::check_model`] refuses a matrix made for another model: every
//! entry must name a tensor of the model, with `ne0 * ne2` weights (one per column per
//! expert of a 3-D expert tensor). llama-quantize skips a tensor the matrix does not
//! name (it quantizes it without weights) and stops at a size mismatch; so do we,
//! except that llama-quantize lets a `token_embd` mismatch pass unweighted, which here
//! is an error like any other.

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::gguf::{Gguf, MAGIC, TensorInfo};
use crate::types::GgmlType;

/// Which format a matrix was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImatrixFormat {
    /// llama-imatrix's GGUF output.
    Gguf,
    /// The legacy `.dat` output.
    Legacy,
}

/// An importance matrix: per tensor name, one weight per column (per expert).
#[derive(Clone, Debug, PartialEq)]
pub struct ImportanceMatrix {
    format: ImatrixFormat,
    entries: BTreeMap<String, Vec<f32>>,
    chunk_count: u64,
    datasets: Vec<String>,
}

fn bad(offset: u64, reason: impl Into<String>) -> Error {
    Error::BadImatrix {
        offset,
        reason: reason.into(),
    }
}

/// The suffixes of the tensors of one entry in the GGUF format.
const IN_SUM2: &str = ".in_sum2";
const IN_SUM: &str = ".in_sum";
const COUNTS: &str = ".counts";

impl ImportanceMatrix {
    /// Reads a matrix file of either format.
    pub fn read(path: impl AsRef<Path>) -> Result<ImportanceMatrix> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| Error::io("read", path, e))?;
        ImportanceMatrix::parse(&bytes)
    }

    /// Parses the bytes of a matrix file of either format.
    pub fn parse(bytes: &[u8]) -> Result<ImportanceMatrix> {
        if bytes.starts_with(&MAGIC) {
            parse_gguf(bytes)
        } else {
            parse_legacy(bytes)
        }
    }

    /// The format it was read from.
    pub fn format(&self) -> ImatrixFormat {
        self.format
    }

    /// Number of entries (weight tensors).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it has no entry (never true of a parsed file).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tensor names it has weights for, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The weights of a tensor: `ne0` per expert, experts one after another.
    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.entries.get(name).map(Vec::as_slice)
    }

    /// The chunk count the file records (0 when a legacy file has no trailer).
    pub fn chunk_count(&self) -> u64 {
        self.chunk_count
    }

    /// The datasets the file names.
    pub fn datasets(&self) -> &[String] {
        &self.datasets
    }

    /// Checks that the matrix was made for this model: every entry names a tensor of
    /// it, with as many weights as [`weights_for`](Self::weights_for) needs.
    pub fn check_model(&self, gguf: &Gguf<'_>) -> Result<()> {
        self.check_shards(std::slice::from_ref(gguf))
    }

    /// [`check_model`](Self::check_model) for a model stored as a shard set: each entry
    /// must name a tensor of one of the shards.
    pub fn check_shards(&self, shards: &[Gguf<'_>]) -> Result<()> {
        for (name, weights) in &self.entries {
            let Some(tensor) = shards.iter().find_map(|g| g.tensor(name)) else {
                return Err(Error::ImatrixMismatch {
                    tensor: name.clone(),
                    reason: "the model has no tensor of that name".into(),
                });
            };
            check_size(tensor, weights)?;
        }
        Ok(())
    }

    /// The weights for a tensor, `None` when the matrix has none for it (llama-quantize
    /// then quantizes it without weights); an error when their number is not the
    /// tensor's `ne0 * ne2`, or the tensor has more than three dimensions.
    pub fn weights_for(&self, tensor: &TensorInfo) -> Result<Option<&[f32]>> {
        match self.entries.get(&tensor.name) {
            None => Ok(None),
            Some(weights) => check_size(tensor, weights).map(|()| Some(weights.as_slice())),
        }
    }
}

fn check_size(tensor: &TensorInfo, weights: &[f32]) -> Result<()> {
    let mismatch = |reason: String| Error::ImatrixMismatch {
        tensor: tensor.name.clone(),
        reason,
    };
    if tensor.dims.len() > 3 {
        return Err(mismatch(format!(
            "the tensor has {} dimensions; importance weights apply to 2-D and 3-D (expert) tensors",
            tensor.dims.len()
        )));
    }
    let ne0 = tensor.dims.first().copied().unwrap_or(1);
    let ne2 = tensor.dims.get(2).copied().unwrap_or(1);
    let expected = ne0.checked_mul(ne2);
    if expected != Some(weights.len() as u64) {
        return Err(mismatch(format!(
            "{} weights, but the tensor's rows have {ne0} columns and it has {ne2} experts",
            weights.len()
        )));
    }
    Ok(())
}

/// Little-endian reader over the legacy format that checks every read.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn left(&self) -> usize {
        self.bytes.len() - self.at
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        if n > self.left() {
            return Err(bad(
                self.at as u64,
                format!(
                    "truncated: {what} needs {n} bytes, {} are left",
                    self.left()
                ),
            ));
        }
        let out = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(out)
    }

    fn i32(&mut self, what: &str) -> Result<i32> {
        let b = self.take(4, what)?;
        Ok(i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    /// A non-negative `i32` count, at least `min`.
    fn count(&mut self, what: &str, min: i32) -> Result<usize> {
        let at = self.at as u64;
        let n = self.i32(what)?;
        if n < min {
            return Err(bad(at, format!("{what} is {n}, expected at least {min}")));
        }
        Ok(n as usize)
    }
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    let (chunks, _) = bytes.as_chunks::<4>();
    chunks.iter().map(|c| f32::from_le_bytes(*c)).collect()
}

fn parse_legacy(bytes: &[u8]) -> Result<ImportanceMatrix> {
    let mut cur = Cursor { bytes, at: 0 };
    let n_entries = cur.count("entry count", 1)?;
    // Each entry takes at least 16 bytes (three counts and one value).
    if n_entries > cur.left() / 16 {
        return Err(bad(
            0,
            format!(
                "{n_entries} entries cannot fit in the {} bytes that follow",
                cur.left()
            ),
        ));
    }
    let mut entries = BTreeMap::new();
    for i in 0..n_entries {
        let name_at = cur.at as u64;
        let len = cur.count("name length", 1)?;
        let name = cur.take(len, "name")?;
        let name = std::str::from_utf8(name)
            .map_err(|_| bad(name_at + 4, format!("the name of entry {i} is not UTF-8")))?
            .to_owned();
        let ncall = cur.count("call count", 0)?;
        let nval = cur.count("value count", 1)?;
        let data_at = cur.at as u64;
        let len = nval
            .checked_mul(4)
            .ok_or_else(|| bad(data_at, "value count overflows"))?;
        let sums = f32s(cur.take(len, "values")?);
        let weights = legacy_weights(&sums, ncall).map_err(|j| {
            bad(
                data_at + 4 * j as u64,
                format!("{name}: value {j} is not finite"),
            )
        })?;
        if entries.insert(name.clone(), weights).is_some() {
            return Err(bad(name_at, format!("entry {name:?} appears twice")));
        }
    }
    let mut chunk_count = 0;
    let mut datasets = Vec::new();
    if cur.left() > 0 {
        chunk_count = cur.count("chunk count", 0)? as u64;
        if cur.left() > 0 {
            let len = cur.count("dataset name length", 0)?;
            let name = cur.take(len, "dataset name")?;
            if len > 0 {
                datasets.push(String::from_utf8_lossy(name).into_owned());
            }
            if cur.left() > 0 {
                return Err(bad(
                    cur.at as u64,
                    format!("{} bytes follow the trailer", cur.left()),
                ));
            }
        }
    }
    Ok(ImportanceMatrix {
        format: ImatrixFormat::Legacy,
        entries,
        chunk_count,
        datasets,
    })
}

/// llama-quantize's weights from a legacy entry: each value divided by the call
/// count, or the values as they are when it is zero. Fails with the index of a value
/// that is not finite.
fn legacy_weights(sums: &[f32], ncall: usize) -> std::result::Result<Vec<f32>, usize> {
    let weights: Vec<f32> = if ncall > 0 {
        let n = ncall as f32;
        sums.iter().map(|s| s / n).collect()
    } else {
        sums.to_vec()
    };
    match weights.iter().position(|w| !w.is_finite()) {
        Some(j) => Err(j),
        None => Ok(weights),
    }
}

/// The F32 values of a tensor of an imatrix GGUF.
fn f32_tensor(gguf: &Gguf<'_>, tensor: &TensorInfo) -> Result<Vec<f32>> {
    if tensor.ggml_type != GgmlType::F32 {
        return Err(bad(
            tensor.info_offset,
            format!("{} is {}, expected F32", tensor.name, tensor.ggml_type),
        ));
    }
    let data = gguf.tensor_data(tensor);
    if data.len() as u64 != tensor.n_elements * 4 {
        return Err(bad(
            tensor.data_offset,
            format!("{} data is cut short", tensor.name),
        ));
    }
    Ok(f32s(data))
}

fn parse_gguf(bytes: &[u8]) -> Result<ImportanceMatrix> {
    let gguf = Gguf::parse(bytes)?;
    for key in [
        "imatrix.datasets",
        "imatrix.chunk_count",
        "imatrix.chunk_size",
    ] {
        if gguf.get(key).is_none() {
            return Err(bad(
                0,
                format!("metadata key {key} is missing (llama-quantize requires it)"),
            ));
        }
    }
    let chunk_count = gguf.get_u64("imatrix.chunk_count")?;
    let datasets = gguf
        .get_array("imatrix.datasets")?
        .strings()
        .map(|s| s.map(|s| s.to_string_lossy().into_owned()).collect())
        .unwrap_or_default();
    // Group the tensors of each entry by name.
    let mut groups: BTreeMap<&str, [Option<&TensorInfo>; 3]> = BTreeMap::new();
    for tensor in gguf.tensors() {
        let name = tensor.name.as_str();
        for (slot, suffix) in [IN_SUM2, IN_SUM, COUNTS].into_iter().enumerate() {
            if let Some(base) = name.strip_suffix(suffix) {
                groups.entry(base).or_default()[slot] = Some(tensor);
                break;
            }
        }
    }
    let mut entries = BTreeMap::new();
    for (name, [sum2, sum, counts]) in groups {
        let (Some(sum2), Some(counts)) = (sum2, counts) else {
            let at = sum2.or(sum).or(counts).map_or(0, |t| t.info_offset);
            return Err(bad(
                at,
                format!("{name} lacks its {IN_SUM2} or {COUNTS} tensor"),
            ));
        };
        if let Some(sum) = sum
            && sum.n_elements != sum2.n_elements
        {
            return Err(bad(
                sum.info_offset,
                format!("{name}: {IN_SUM} and {IN_SUM2} differ in size"),
            ));
        }
        let sums = f32_tensor(&gguf, sum2)?;
        let counts_values = f32_tensor(&gguf, counts)?;
        let n_counts = counts_values.len();
        if n_counts == 0 || sums.is_empty() || !sums.len().is_multiple_of(n_counts) {
            return Err(bad(
                counts.info_offset,
                format!(
                    "{name}: {} sums cannot be split among {n_counts} counts",
                    sums.len()
                ),
            ));
        }
        let ne0 = sums.len() / n_counts;
        let mut weights = Vec::with_capacity(sums.len());
        for (j, (&count, row)) in counts_values.iter().zip(sums.chunks(ne0)).enumerate() {
            if !count.is_finite() || count < 0.0 {
                return Err(bad(
                    counts.data_offset + 4 * j as u64,
                    format!("{name}: count {j} is {count}"),
                ));
            }
            // llama.cpp rounds each count to an integer (half away from zero) and
            // divides in f32.
            let count = count.round() as i64 as f32;
            if count > 0.0 {
                weights.extend(row.iter().map(|s| s / count));
            } else {
                weights.extend(std::iter::repeat_n(1.0f32, ne0));
            }
        }
        if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
            return Err(bad(
                sum2.data_offset + 4 * i as u64,
                format!("{name}: weight {i} is not finite"),
            ));
        }
        entries.insert(name.to_owned(), weights);
    }
    if entries.is_empty() {
        return Err(bad(
            0,
            format!("no {IN_SUM2} tensors: this GGUF file is not an importance matrix"),
        ));
    }
    Ok(ImportanceMatrix {
        format: ImatrixFormat::Gguf,
        entries,
        chunk_count,
        datasets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::Array;
    use crate::writer::{GgufWriter, TensorSpec};

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    /// A legacy file: entries of (name, ncall, values), then an optional trailer.
    fn legacy(entries: &[(&str, i32, &[f32])], trailer: Option<(i32, &str)>) -> Vec<u8> {
        let mut b = (entries.len() as i32).to_le_bytes().to_vec();
        for (name, ncall, values) in entries {
            b.extend((name.len() as i32).to_le_bytes());
            b.extend(name.as_bytes());
            b.extend(ncall.to_le_bytes());
            b.extend((values.len() as i32).to_le_bytes());
            b.extend(f32_bytes(values));
        }
        if let Some((chunks, dataset)) = trailer {
            b.extend(chunks.to_le_bytes());
            b.extend((dataset.len() as i32).to_le_bytes());
            b.extend(dataset.as_bytes());
        }
        b
    }

    /// An imatrix GGUF: per entry its sums and counts (and optionally `in_sum`).
    fn gguf_matrix(entries: &[(&str, Vec<f32>, Vec<f32>)], metadata: bool) -> Vec<u8> {
        let mut w = GgufWriter::new();
        if metadata {
            w.set("imatrix.datasets", Array::of_strings(["text.txt"]))
                .set("imatrix.chunk_count", 3u32)
                .set("imatrix.chunk_size", 512u32);
        }
        for (name, sums, counts) in entries {
            w.add_tensor(TensorSpec::from_bytes(
                format!("{name}.in_sum2"),
                vec![sums.len() as u64],
                GgmlType::F32,
                f32_bytes(sums),
            ));
            w.add_tensor(TensorSpec::from_bytes(
                format!("{name}.counts"),
                vec![1, counts.len() as u64],
                GgmlType::F32,
                f32_bytes(counts),
            ));
        }
        let mut out = Vec::new();
        w.write_to(&mut out).unwrap();
        out
    }

    /// A model with a 2-D tensor of 64 columns and a 3-D expert tensor of 32 columns,
    /// 4 rows, 2 experts.
    fn model() -> Vec<u8> {
        let mut w = GgufWriter::new();
        w.set("general.architecture", "llama");
        w.add_tensor(TensorSpec::from_bytes(
            "blk.0.ffn_up.weight",
            vec![64, 2],
            GgmlType::F32,
            vec![0u8; 64 * 2 * 4],
        ));
        w.add_tensor(TensorSpec::from_bytes(
            "blk.0.ffn_up_exps.weight",
            vec![32, 4, 2],
            GgmlType::F32,
            vec![0u8; 32 * 4 * 2 * 4],
        ));
        let mut out = Vec::new();
        w.write_to(&mut out).unwrap();
        out
    }

    #[test]
    fn legacy_weights_are_the_values_divided_by_the_call_count() {
        let bytes = legacy(
            &[("a.weight", 4, &[8.0, 2.0, 1.0]), ("b.weight", 0, &[3.0])],
            Some((7, "wiki.txt")),
        );
        let m = ImportanceMatrix::parse(&bytes).unwrap();
        assert_eq!(m.format(), ImatrixFormat::Legacy);
        assert_eq!(m.get("a.weight").unwrap(), &[2.0, 0.5, 0.25]);
        assert_eq!(m.get("b.weight").unwrap(), &[3.0]);
        assert_eq!(m.chunk_count(), 7);
        assert_eq!(m.datasets(), &["wiki.txt".to_owned()]);
        // The trailer is optional.
        let bare = legacy(&[("a.weight", 1, &[5.0])], None);
        assert_eq!(
            ImportanceMatrix::parse(&bare).unwrap().get("a.weight"),
            Some(&[5.0f32][..])
        );
    }

    #[test]
    fn gguf_weights_are_sums_over_counts_per_expert_and_one_where_nothing_was_counted() {
        let bytes = gguf_matrix(
            &[
                ("blk.0.ffn_up.weight", vec![6.0, 3.0], vec![3.0]),
                (
                    "blk.0.ffn_up_exps.weight",
                    vec![4.0, 8.0, 5.0, 7.0],
                    vec![2.0, 0.0],
                ),
            ],
            true,
        );
        let m = ImportanceMatrix::parse(&bytes).unwrap();
        assert_eq!(m.format(), ImatrixFormat::Gguf);
        assert_eq!(m.get("blk.0.ffn_up.weight").unwrap(), &[2.0, 1.0]);
        assert_eq!(
            m.get("blk.0.ffn_up_exps.weight").unwrap(),
            &[2.0, 4.0, 1.0, 1.0]
        );
        assert_eq!(m.chunk_count(), 3);
        assert_eq!(m.len(), 2);
    }

    fn is_bad(result: Result<ImportanceMatrix>) -> bool {
        matches!(result, Err(Error::BadImatrix { .. }))
    }

    #[test]
    fn every_truncation_of_either_format_is_refused() {
        let dat = legacy(
            &[("a.weight", 2, &[1.0, 2.0]), ("b.weight", 1, &[3.0])],
            Some((1, "t")),
        );
        // Cutting the trailer's length and name is refused like the rest; only a cut
        // exactly after the entries (no trailer) or after the chunk count is whole.
        let whole_at = [dat.len() - 9, dat.len() - 5];
        for cut in 0..dat.len() {
            if whole_at.contains(&cut) {
                assert!(ImportanceMatrix::parse(&dat[..cut]).is_ok(), "cut {cut}");
            } else {
                assert!(is_bad(ImportanceMatrix::parse(&dat[..cut])), "cut {cut}");
            }
        }
        let gguf = gguf_matrix(&[("a.weight", vec![1.0; 8], vec![1.0])], true);
        // Cuts inside the padding after the last tensor leave every byte that counts.
        let parsed = Gguf::parse(&gguf).unwrap();
        let end = parsed
            .tensors()
            .iter()
            .map(|t| t.data_range().end)
            .max()
            .unwrap();
        for cut in (0..end as usize).step_by(7).chain([end as usize - 1]) {
            assert!(ImportanceMatrix::parse(&gguf[..cut]).is_err(), "cut {cut}");
        }
    }

    #[test]
    fn malformed_files_are_refused_without_huge_allocations() {
        // An entry count or a value count far beyond the file.
        let mut dat = legacy(&[("a.weight", 1, &[1.0])], None);
        dat[..4].copy_from_slice(&i32::MAX.to_le_bytes());
        assert!(matches!(
            ImportanceMatrix::parse(&dat),
            Err(Error::BadImatrix { offset: 0, .. })
        ));
        let mut dat = legacy(&[("a.weight", 1, &[1.0])], None);
        let nval_at = 4 + 4 + 8 + 4;
        dat[nval_at..nval_at + 4].copy_from_slice(&i32::MAX.to_le_bytes());
        assert!(matches!(
            ImportanceMatrix::parse(&dat),
            Err(Error::BadImatrix { .. })
        ));
        // Negative counts, non-finite values, duplicates.
        let dat = legacy(&[("a.weight", -1, &[1.0])], None);
        assert!(matches!(
            ImportanceMatrix::parse(&dat),
            Err(Error::BadImatrix { .. })
        ));
        let dat = legacy(&[("a.weight", 1, &[f32::NAN])], None);
        assert!(matches!(
            ImportanceMatrix::parse(&dat),
            Err(Error::BadImatrix { .. })
        ));
        let dat = legacy(&[("a.weight", 1, &[1.0]), ("a.weight", 1, &[1.0])], None);
        assert!(matches!(
            ImportanceMatrix::parse(&dat),
            Err(Error::BadImatrix { .. })
        ));
        // GGUF: counts that do not divide the sums, negative counts, no metadata, and a
        // GGUF file that is no importance matrix.
        let bad = [
            gguf_matrix(&[("a.weight", vec![1.0; 3], vec![1.0, 1.0])], true),
            gguf_matrix(&[("a.weight", vec![1.0; 2], vec![-1.0])], true),
            gguf_matrix(&[("a.weight", vec![1.0; 2], vec![1.0])], false),
            model(),
        ];
        for bytes in bad {
            assert!(matches!(
                ImportanceMatrix::parse(&bytes),
                Err(Error::BadImatrix { .. })
            ));
        }
    }

    #[test]
    fn a_matrix_of_another_model_is_refused_and_a_missing_tensor_has_no_weights() {
        let bytes = model();
        let gguf = Gguf::parse(&bytes).unwrap();
        let fits = gguf_matrix(
            &[
                ("blk.0.ffn_up.weight", vec![1.0; 64], vec![1.0]),
                ("blk.0.ffn_up_exps.weight", vec![1.0; 64], vec![1.0, 1.0]),
            ],
            true,
        );
        let m = ImportanceMatrix::parse(&fits).unwrap();
        m.check_model(&gguf).unwrap();
        let exps = gguf.require_tensor("blk.0.ffn_up_exps.weight").unwrap();
        assert_eq!(m.weights_for(exps).unwrap().map(<[f32]>::len), Some(64));
        let only_one = legacy(&[("blk.0.ffn_up.weight", 1, &[1.0; 64])], None);
        let m = ImportanceMatrix::parse(&only_one).unwrap();
        m.check_model(&gguf).unwrap();
        assert_eq!(m.weights_for(exps).unwrap(), None);
        for (name, n) in [
            ("blk.0.ffn_up.weight", 32),
            ("blk.0.ffn_up_exps.weight", 32),
            ("blk.9.ffn_up.weight", 64),
        ] {
            let values = vec![1.0f32; n];
            let m = ImportanceMatrix::parse(&legacy(&[(name, 1, &values)], None)).unwrap();
            assert!(
                matches!(m.check_model(&gguf), Err(Error::ImatrixMismatch { ref tensor, .. }) if tensor == name),
                "{name} with {n} weights"
            );
        }
    }
}
