//! Per-layer change between two models, and its plot (`hotpatch diff A B --plot F.svg`).

use std::collections::BTreeMap;
use std::path::Path;

use byte_tier::codec::{self, CHUNK_ELEMENTS};
use byte_tier::{Gguf, TensorInfo};
use plotters::prelude::*;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, Result};

/// How much one group of tensors changed: `||B - A|| / ||A||` over the values of every
/// tensor of the group present in both files with the same type and shape.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LayerChange {
    /// The block index, or `None` for tensors outside the blocks (embeddings, output).
    pub layer: Option<u64>,
    /// The relative change of the group's weights (0 when nothing changed).
    pub relative_change: f64,
    /// Tensors compared.
    pub tensors: usize,
    /// Tensors whose bytes differ.
    pub tensors_changed: usize,
}

fn layer_of(name: &str) -> Option<u64> {
    let rest = name.strip_prefix("blk.")?;
    rest.split_once('.')?.0.parse().ok()
}

/// Sum of squares of A and of B - A over one tensor pair, chunk by chunk.
fn sums(a: &Gguf<'_>, ta: &TensorInfo, b: &Gguf<'_>, tb: &TensorInfo) -> Result<(f64, f64, bool)> {
    let (da, db) = (a.tensor_data(ta), b.tensor_data(tb));
    let changed = da != db;
    let block = ta.ggml_type.block_len();
    let step = (CHUNK_ELEMENTS as u64).div_ceil(block) * block;
    let n = ta.n_elements;
    let chunks: Vec<u64> = (0..n.div_ceil(step)).collect();
    chunks
        .par_iter()
        .map(|i| {
            let range = i * step..((i + 1) * step).min(n);
            let len = (range.end - range.start) as usize;
            let mut va = vec![0f32; len];
            codec::dequantize_range(ta.ggml_type, da, range.clone(), &mut va)
                .map_err(|e| e.in_tensor(&ta.name))?;
            let norm: f64 = va.iter().map(|x| f64::from(*x) * f64::from(*x)).sum();
            if !changed {
                return Ok((norm, 0.0));
            }
            let mut vb = vec![0f32; len];
            codec::dequantize_range(tb.ggml_type, db, range, &mut vb)
                .map_err(|e| e.in_tensor(&tb.name))?;
            let delta: f64 = va
                .iter()
                .zip(&vb)
                .map(|(x, y)| {
                    let d = f64::from(*y) - f64::from(*x);
                    d * d
                })
                .sum();
            Ok((norm, delta))
        })
        .try_reduce(|| (0.0, 0.0), |x, y| Ok((x.0 + y.0, x.1 + y.1)))
        .map(|(norm, delta)| (norm, delta, changed))
}

/// The relative change of each block (and of the tensors outside the blocks) from `a`
/// to `b`. Tensors whose type or shape differ, or that have no decoder, are left out.
pub fn layer_changes(a: &Gguf<'_>, b: &Gguf<'_>) -> Result<Vec<LayerChange>> {
    let pairs: Vec<(&TensorInfo, &TensorInfo)> = a
        .tensors()
        .iter()
        .filter_map(|ta| b.tensor(&ta.name).map(|tb| (ta, tb)))
        .filter(|(ta, tb)| {
            ta.ggml_type == tb.ggml_type
                && ta.dims == tb.dims
                && codec::can_dequantize(ta.ggml_type)
        })
        .collect();
    let mut groups: BTreeMap<(bool, u64), (f64, f64, usize, usize)> = BTreeMap::new();
    for (ta, tb) in pairs {
        let (norm, delta, changed) = sums(a, ta, b, tb)?;
        let key = match layer_of(&ta.name) {
            Some(l) => (false, l),
            None => (true, 0),
        };
        let group = groups.entry(key).or_default();
        group.0 += norm;
        group.1 += delta;
        group.2 += 1;
        group.3 += usize::from(changed);
    }
    Ok(groups
        .into_iter()
        .map(
            |((other, l), (norm, delta, tensors, changed))| LayerChange {
                layer: (!other).then_some(l),
                relative_change: if delta == 0.0 {
                    0.0
                } else {
                    (delta / norm.max(f64::MIN_POSITIVE)).sqrt()
                },
                tensors,
                tensors_changed: changed,
            },
        )
        .collect())
}

/// Draws the changes as a bar chart (one bar per block, then one for the tensors
/// outside the blocks) into an SVG file.
pub fn plot_layer_changes(changes: &[LayerChange], title: &str, path: &Path) -> Result<()> {
    let failed =
        |e: &dyn std::fmt::Display| Error::Refused(format!("plot {}: {e}", path.display()));
    let n = changes.len().max(1) as u32;
    let top = changes
        .iter()
        .map(|c| c.relative_change * 100.0)
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let label = |i: u32| match changes.get(i as usize).map(|c| c.layer) {
        Some(Some(l)) => l.to_string(),
        Some(None) => "other".to_owned(),
        None => String::new(),
    };
    let root = SVGBackend::new(path, (900, 450)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| failed(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0u32..n).into_segmented(), 0f64..top)
        .map_err(|e| failed(&e))?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("block")
        .y_desc("relative change of the weights (%)")
        .x_labels(changes.len().min(64))
        .x_label_formatter(&|v: &SegmentValue<u32>| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => label(*i),
            SegmentValue::Last => String::new(),
        })
        .draw()
        .map_err(|e| failed(&e))?;
    chart
        .draw_series(
            Histogram::vertical(&chart)
                .style(RGBColor(52, 101, 164).filled())
                .margin(2)
                .data(
                    changes
                        .iter()
                        .enumerate()
                        .map(|(i, c)| (i as u32, c.relative_change * 100.0)),
                ),
        )
        .map_err(|e| failed(&e))?;
    root.present().map_err(|e| failed(&e))?;
    Ok(())
}
