//! The region logic on memory the test owns: layered apply and revert, and readers
//! racing a writer. These run under Miri too (`cargo xtask alloc-check`), which checks
//! every read and write of the region against Rust's aliasing rules and for data races;
//! Miri has no page protection, so there the pages stay as they are.

#![allow(unsafe_code)]

use std::alloc::{Layout, alloc_zeroed, dealloc};
use std::ptr::NonNull;

use uuid::Uuid;

use super::{LiveModel, image_with, split_for_revert};
use crate::patch::{MemoryPatch, PatchTarget, Payload};
use crate::sys::page_size;

/// Page-aligned heap memory, freed when dropped; every model over it is detached first,
/// which gives the pages back writable.
struct Memory {
    start: NonNull<u8>,
    layout: Layout,
}

impl Memory {
    fn new(pages: usize) -> Memory {
        let layout = Layout::from_size_align(pages * page_size(), page_size()).unwrap();
        // SAFETY: the layout has a non-zero size.
        let start = NonNull::new(unsafe { alloc_zeroed(layout) }).unwrap();
        Memory { start, layout }
    }

    /// A model over the whole memory, with no tensor table (raw patches only).
    fn model(&self) -> LiveModel {
        // SAFETY: the memory is valid, readable and writable for `layout.size()` bytes,
        // page-aligned, and outlives the model in every test (the model is dropped
        // first); nothing else touches it while the model is attached.
        unsafe { LiveModel::attach_raw(self.start, self.layout.size(), Some(Vec::new())) }.unwrap()
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // A failed assertion unwinds past the model's detach, leaving the pages
        // read-only: the memory is leaked then rather than freed under the allocator.
        if std::thread::panicking() {
            return;
        }
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { dealloc(self.start.as_ptr(), self.layout) }
    }
}

fn raw(name: &str, start: u64, len: u64, byte: u8) -> MemoryPatch {
    MemoryPatch::new(
        name,
        PatchTarget::Raw(start..start + len),
        Payload::Bytes(vec![byte; len as usize]),
    )
}

fn bytes(model: &LiveModel, len: usize) -> Vec<u8> {
    model.read().bytes()[..len].to_vec()
}

#[test]
fn layers_revert_in_either_order() {
    let memory = Memory::new(1);
    // B over A: reverting B brings A back.
    let (a, b, model) = model_with_layers(&memory);
    model.revert(b).unwrap();
    assert_eq!(bytes(&model, 24), [vec![1; 16], vec![0; 8]].concat());
    model.revert(a).unwrap();
    assert_eq!(bytes(&model, 24), vec![0; 24]);
    model.detach(false).unwrap();

    // Reverting A under B restores only A's uncovered bytes; B then restores the
    // original ones, not A's.
    let (a, b, model) = model_with_layers(&memory);
    model.revert(a).unwrap();
    assert_eq!(bytes(&model, 24), [vec![0; 8], vec![3; 16]].concat());
    model.revert(b).unwrap();
    assert_eq!(bytes(&model, 24), vec![0; 24]);
    model.detach(false).unwrap();
}

/// A (bytes 0..16 = 1, priority 1) under B (bytes 8..24 = 3, priority 2).
fn model_with_layers(memory: &Memory) -> (Uuid, Uuid, LiveModel) {
    let model = memory.model();
    let a = model.apply(raw("A", 0, 16, 1).with_priority(1)).unwrap();
    let b = model.apply(raw("B", 8, 16, 3).with_priority(2)).unwrap();
    assert_eq!(bytes(&model, 24), [vec![1; 8], vec![3; 16]].concat());
    (a, b, model)
}

#[test]
fn readers_never_see_a_half_applied_patch_while_a_writer_runs() {
    let memory = Memory::new(1);
    let model = memory.model();
    let rounds = if cfg!(miri) { 4 } else { 200 };
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for i in 0..rounds {
                let id = model.apply(raw(&format!("w{i}"), 64, 64, 7)).unwrap();
                model.revert(id).unwrap();
            }
        });
        for _ in 0..rounds {
            let conflicts = model.check_conflicts(&raw("probe", 96, 8, 9)).unwrap();
            assert!(conflicts.len() <= 1);
            let guard = model.read();
            let run = &guard.bytes()[64..128];
            // All old or all new: the writer holds the lock for the whole patch.
            assert!(run.iter().all(|&b| b == run[0]), "{run:?}");
        }
    });
    assert_eq!(bytes(&model, 256), vec![0; 256]);
    model.detach(false).unwrap();
}

#[test]
fn images_and_runs_compose_undo_data() {
    let region = [0u8, 1, 2, 3, 4, 5, 6, 7];
    let undo_a = vec![(2u64, vec![9, 9]), (6, vec![8])];
    let undo_b = vec![(3u64, vec![5, 5, 5])];
    // Later overlays win, and runs outside the range are clipped.
    assert_eq!(
        image_with(&region, &(1..7), &[&undo_a, &undo_b]),
        vec![1, 9, 5, 5, 5, 8]
    );
}

#[test]
fn a_reverted_patchs_runs_split_between_the_region_and_the_patches_above() {
    let memory = Memory::new(1);
    let model = memory.model();
    let a = model.apply(raw("A", 0, 16, 1).with_priority(1)).unwrap();
    let b = model.apply(raw("B", 4, 4, 2).with_priority(2)).unwrap();
    let c = model.apply(raw("C", 6, 6, 3).with_priority(3)).unwrap();
    let state = model.region.read();
    let (to_region, handed) = split_for_revert(&state.applied[0].undo, &state.applied[1..]);
    // 4..8 to B (the first above that changed them), 8..12 to C, the rest back to the
    // region.
    assert_eq!(to_region, vec![(0, vec![0; 4]), (12, vec![0; 4])]);
    assert_eq!(handed, vec![(0, 4, vec![0; 4]), (1, 8, vec![0; 4])]);
    drop(state);
    for id in [a, c, b] {
        model.revert(id).unwrap();
    }
    assert_eq!(bytes(&model, 16), vec![0; 16]);
    model.detach(false).unwrap();
}
