//! Per-layer change between two models, and its plot (`hotpatch diff A B --plot F.svg`).

use std::collections::BTreeMap;
use std::path::Path;

use byte_tier::codec::{self, CHUNK_ELEMENTS};
use byte_tier::diff::TensorChange;
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
    /// The relative change of the group's weights as a whole, `||B - A|| / ||A||` over
    /// all of them, as a fraction (0.2 is 20%; 0 when nothing changed).
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

/// How much one tensor changed, as `hotpatch diff` prints it: the RMS of the difference
/// as a percentage of the RMS of the first file's values (`||B - A|| / ||A||` in percent),
/// when both dequantize.
pub fn percent_of_rms(change: &TensorChange) -> Option<f64> {
    match (change.rms, change.rms_a) {
        (Some(rms), Some(rms_a)) if rms_a > 0.0 => Some(100.0 * rms / rms_a),
        _ => None,
    }
}

/// One changed tensor in the words and numbers of `hotpatch diff`'s text report.
pub fn describe_tensor_change(change: &TensorChange) -> String {
    let layout = change
        .layout_change
        .as_ref()
        .map(|(x, y)| format!(" ({x} -> {y})"))
        .unwrap_or_default();
    let values = match (change.max_abs, change.rms, percent_of_rms(change)) {
        (Some(m), Some(r), Some(percent)) => {
            format!(", values: max |d| {m:.4e}, rms {r:.4e} ({percent:.2}% of rms)")
        }
        (Some(m), Some(r), None) => format!(", values: max |d| {m:.4e}, rms {r:.4e}"),
        _ => String::new(),
    };
    format!(
        "{}{layout}: {} bytes differ{values}",
        change.name, change.bytes_changed
    )
}

/// What one bar shows: the largest change of a tensor of the group, in percent of its
/// RMS (the number `hotpatch diff` prints for that tensor), and the tooltip text.
fn bar(change: &LayerChange, tensor_changes: &[TensorChange]) -> (f64, String) {
    let group = |name: &str| layer_of(name) == change.layer;
    let members: Vec<&TensorChange> = tensor_changes.iter().filter(|c| group(&c.name)).collect();
    let height = members
        .iter()
        .filter_map(|c| percent_of_rms(c))
        .fold(0.0f64, f64::max);
    let name = match change.layer {
        Some(layer) => format!("block {layer}"),
        None => "tensors outside the blocks".to_owned(),
    };
    let mut tooltip = format!(
        "{name}: largest tensor change {height:.2}% of rms; whole group {:.2}% \
         (||B - A|| / ||A||); {} of {} tensors changed",
        change.relative_change * 100.0,
        change.tensors_changed,
        change.tensors
    );
    for member in members {
        tooltip.push('\n');
        tooltip.push_str(&describe_tensor_change(member));
    }
    (height, tooltip)
}

/// Draws the changes as a bar chart into an SVG file: one bar per block, then one for the
/// tensors outside the blocks. A bar's height is the largest change of one of its tensors
/// in percent of that tensor's RMS, the number `hotpatch diff` prints (`tensor_changes`
/// are the tensors `byte_tier::diff::diff` found changed); its tooltip (`<title>`) holds
/// the text report's line of every changed tensor of the group and the whole group's
/// relative change.
pub fn plot_layer_changes(
    changes: &[LayerChange],
    tensor_changes: &[TensorChange],
    title: &str,
    path: &Path,
) -> Result<()> {
    let failed =
        |e: &dyn std::fmt::Display| Error::Refused(format!("plot {}: {e}", path.display()));
    let bars: Vec<(f64, String)> = changes.iter().map(|c| bar(c, tensor_changes)).collect();
    let n = changes.len().max(1) as u32;
    let top = bars
        .iter()
        .map(|(height, _)| *height)
        .fold(0.0f64, f64::max);
    let top = if top > 0.0 { top * 1.15 } else { 1.0 };
    let label = |i: u32| match changes.get(i as usize).map(|c| c.layer) {
        Some(Some(l)) => l.to_string(),
        Some(None) => "other".to_owned(),
        None => String::new(),
    };
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 450)).into_drawing_area();
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
            .y_desc(Y_AXIS)
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
                    .style(BAR_COLOUR.filled())
                    .margin(2)
                    .data(
                        bars.iter()
                            .enumerate()
                            .map(|(i, (height, _))| (i as u32, *height)),
                    ),
            )
            .map_err(|e| failed(&e))?;
        root.present().map_err(|e| failed(&e))?;
    }
    let tooltips: Vec<&str> = bars.iter().map(|(_, tooltip)| tooltip.as_str()).collect();
    let svg = with_tooltips(&svg, &tooltips).map_err(|e| failed(&e))?;
    std::fs::write(path, svg).map_err(|e| failed(&e))
}

/// The y axis's title.
pub const Y_AXIS: &str = "largest tensor change in the group (% of rms)";

const BAR_COLOUR: RGBColor = RGBColor(52, 101, 164);

/// Gives every bar of the chart its tooltip: each bar's `<rect/>` (plotters writes them
/// in no particular order, one per line) becomes `<rect><title>..</title></rect>`, matched
/// to its group by its `x` position.
fn with_tooltips(svg: &str, tooltips: &[&str]) -> std::result::Result<String, String> {
    let fill = format!(
        "fill=\"#{:02X}{:02X}{:02X}\"",
        BAR_COLOUR.0, BAR_COLOUR.1, BAR_COLOUR.2
    );
    let x_of = |line: &str| -> Option<i64> {
        let rest = line.split_once(" x=\"")?.1;
        rest.split_once('"')?.0.parse().ok()
    };
    let mut bars: Vec<(i64, usize)> = svg
        .lines()
        .enumerate()
        .filter(|(_, line)| line.trim_start().starts_with("<rect") && line.contains(&fill))
        .filter_map(|(index, line)| Some((x_of(line)?, index)))
        .collect();
    if bars.len() != tooltips.len() {
        return Err(format!(
            "found {} bars for {} groups in the drawing",
            bars.len(),
            tooltips.len()
        ));
    }
    bars.sort_unstable();
    let mut tooltip_of_line = vec![None; svg.lines().count()];
    for ((_, line), tooltip) in bars.iter().zip(tooltips) {
        tooltip_of_line[*line] = Some(*tooltip);
    }
    let mut out =
        String::with_capacity(svg.len() + tooltips.iter().map(|t| t.len() + 32).sum::<usize>());
    for (line, tooltip) in svg.lines().zip(tooltip_of_line) {
        match (tooltip, line.trim_end().strip_suffix("/>")) {
            (Some(tooltip), Some(open)) => {
                out.push_str(open);
                out.push_str("><title>");
                out.push_str(&escape_xml(tooltip));
                out.push_str("</title></rect>");
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    Ok(out)
}

fn escape_xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
    out
}
