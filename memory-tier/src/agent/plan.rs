//! How a change of a tensor's bytes reaches the server's copy of it: which writes the
//! agent is sent, depending on the buffer that holds the tensor.

// One range in a list of ranges is the common case here, not a mistake.
#![allow(clippy::single_range_in_vec_init)]

use std::ops::Range;

use super::proto::{Access, TensorEntry, WriteSpec};
use crate::error::{Error, Result};

/// How one tensor's change reaches the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// The server reads the tensor straight from the file mapping: the file's change is
    /// the patch, and the agent is sent nothing.
    File,
    /// The agent writes these byte ranges of the tensor (offsets in the tensor).
    Agent(Vec<Range<u64>>),
}

/// Ranges closer than this are written as one, unchanged bytes between them included:
/// one copy of a few more bytes costs less than another call into the backend.
pub const MERGE_GAP: u64 = 4096;

/// Plans the writes that carry a change of `changed` (absolute byte ranges of the file)
/// to a tensor whose data lies at `tensor` in the file and which the server holds as
/// `entry` describes. `through_file` says whether the file itself is being changed (a
/// shared, journaled mapping); a file view can only be reached that way.
pub fn route(
    entry: &TensorEntry,
    tensor: &Range<u64>,
    changed: &[Range<u64>],
    through_file: bool,
) -> Result<Route> {
    let size = tensor.end - tensor.start;
    if entry.nbytes != size {
        return Err(Error::AgentTensorMismatch {
            tensor: entry.name.clone(),
            file_bytes: size,
            server_bytes: entry.nbytes,
        });
    }
    let mut ranges: Vec<Range<u64>> = changed
        .iter()
        .filter_map(|r| {
            let start = r.start.max(tensor.start);
            let end = r.end.min(tensor.end);
            (start < end).then(|| start - tensor.start..end - tensor.start)
        })
        .collect();
    if ranges.is_empty() {
        return Ok(Route::Agent(Vec::new()));
    }
    match entry.access {
        Access::FileView if through_file => Ok(Route::File),
        Access::FileView => Err(Error::FileViewNeedsFile {
            tensor: entry.name.clone(),
        }),
        Access::WholeTensor => Ok(Route::Agent(vec![0..size])),
        Access::Host | Access::Device | Access::Remote => {
            ranges.sort_by_key(|r| r.start);
            let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
            for r in ranges {
                match merged.last_mut() {
                    Some(last) if r.start <= last.end.saturating_add(MERGE_GAP) => {
                        last.end = last.end.max(r.end);
                    }
                    _ => merged.push(r),
                }
            }
            Ok(Route::Agent(merged))
        }
    }
}

/// The write specs of `ranges` of `tensor`.
pub fn specs(tensor: &str, ranges: &[Range<u64>]) -> Vec<WriteSpec> {
    ranges
        .iter()
        .map(|r| WriteSpec {
            tensor: tensor.to_owned(),
            offset: r.start,
            len: r.end - r.start,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(access: Access, nbytes: u64) -> TensorEntry {
        TensorEntry {
            name: "blk.0.ffn_up.weight".into(),
            ggml_type: 12,
            type_name: "q4_K".into(),
            ne: [256, 8, 1, 1],
            nbytes,
            buffer: "CUDA0".into(),
            access,
            file: None,
        }
    }

    #[test]
    fn device_buffers_take_the_changed_ranges_merged_and_relative_to_the_tensor() {
        let e = entry(Access::Device, 1 << 20);
        let tensor = 1000..1000 + (1 << 20);
        let changed = [
            1000 + 144..1000 + 288,
            1000 + 288..1000 + 432,
            1000 + 100_000..1000 + 100_144,
            1000 + 100_144 + MERGE_GAP..1000 + 100_288 + MERGE_GAP,
        ];
        let route = route(&e, &tensor, &changed, false).unwrap();
        assert_eq!(
            route,
            Route::Agent(vec![144..432, 100_000..100_288 + MERGE_GAP])
        );
    }

    #[test]
    fn ranges_are_clipped_to_the_tensor_and_unsorted_input_is_fine() {
        let e = entry(Access::Remote, 4096);
        let tensor = 8192..8192 + 4096;
        let changed = [12_000..20_000, 0..8300];
        assert_eq!(
            route(&e, &tensor, &changed, false).unwrap(),
            Route::Agent(vec![0..4096])
        );
        let far = [8192..8200, 8192 + 4090..8192 + 4096];
        let e = entry(Access::Host, 4096);
        // 4082 bytes apart: within the merge gap, so one write.
        assert_eq!(
            route(&e, &tensor, &far, false).unwrap(),
            Route::Agent(vec![0..4096])
        );
    }

    #[test]
    fn repacked_buffers_get_the_whole_tensor_whatever_changed() {
        let e = entry(Access::WholeTensor, 9216);
        let tensor = 0..9216;
        assert_eq!(
            route(&e, &tensor, &[144..288], false).unwrap(),
            Route::Agent(vec![0..9216])
        );
    }

    #[test]
    fn file_views_go_through_the_file_or_are_refused() {
        let e = entry(Access::FileView, 512);
        assert_eq!(route(&e, &(0..512), &[0..4], true).unwrap(), Route::File);
        assert!(matches!(
            route(&e, &(0..512), &[0..4], false),
            Err(Error::FileViewNeedsFile { .. })
        ));
    }

    #[test]
    fn a_size_mismatch_means_another_model_and_is_refused() {
        let e = entry(Access::Device, 512);
        assert!(matches!(
            route(&e, &(0..1024), &[0..4], false),
            Err(Error::AgentTensorMismatch {
                file_bytes: 1024,
                server_bytes: 512,
                ..
            })
        ));
    }

    #[test]
    fn nothing_changed_in_the_tensor_means_no_write() {
        let e = entry(Access::WholeTensor, 512);
        assert_eq!(
            route(&e, &(512..1024), &[0..512, 1024..2048], false).unwrap(),
            Route::Agent(vec![])
        );
    }
}
