//! Direct region operations, tensor operations, layer bypass, the skip set and events.

use std::path::{Path, PathBuf};

use byte_tier::{GgmlType, GgufWriter, TensorSpec};
use memory_tier::{AttachMode, Event, LayerSkipSet, LiveModel, block_tensors};

fn layered_model(dir: &Path) -> PathBuf {
    let path = dir.join("layers.gguf");
    let mut w = GgufWriter::new();
    w.set("general.architecture", "toy")
        .set("toy.block_count", 2u32);
    for b in 0..2u8 {
        for part in ["attn_norm", "attn_output", "ffn_down"] {
            let bytes: Vec<u8> = (0..64u32)
                .flat_map(|i| ((i + u32::from(b)) as f32).to_le_bytes())
                .collect();
            w.add_tensor(TensorSpec::from_bytes(
                format!("blk.{b}.{part}.weight"),
                vec![64],
                GgmlType::F32,
                bytes,
            ));
        }
    }
    w.add_tensor(TensorSpec::from_bytes(
        "flags",
        vec![4],
        GgmlType::I32,
        vec![0u8; 16],
    ));
    w.write_to_path(&path).unwrap();
    path
}

#[test]
fn direct_operations_are_checked_recorded_and_revertible() {
    let dir = tempfile::tempdir().unwrap();
    let model = LiveModel::attach(layered_model(dir.path()), AttachMode::Owned).unwrap();
    let before = model.extract(0..model.len()).unwrap();
    let t = model.tensor("blk.0.attn_norm.weight").unwrap().clone();
    let s = t.data_offset;

    model.fill(s..s + 8, 0xee).unwrap();
    assert_eq!(model.compare(s, &[0xee; 8]).unwrap(), vec![]);
    assert_eq!(
        model.compare(s, &[0xee, 0, 0xee]).unwrap(),
        vec![s + 1..s + 2]
    );
    model.copy(s, s + 4, 8).unwrap_err(); // overlaps the fill patch: equal priority
    model.swap(s + 64, s + 128, 16).unwrap();
    assert_eq!(
        model.search(&[0xee; 8], Some(t.data_range())).unwrap(),
        vec![s]
    );
    assert!(
        model
            .hexdump(s..s + 16)
            .unwrap()
            .starts_with(&format!("{s:08x}  ee ee ee ee"))
    );

    let flags = model.tensor("flags").unwrap().data_offset;
    assert_eq!(model.atomic_store(flags, 4, 7).unwrap(), 0);
    assert_eq!(model.compare_exchange(flags, 4, 7, 9).unwrap(), Ok(7));
    assert_eq!(model.compare_exchange(flags, 4, 7, 11).unwrap(), Err(9));
    assert!(
        model.atomic_store(flags + 2, 4, 1).is_err(),
        "a misaligned word is refused"
    );
    model.atomic_store(flags, 4, 0).unwrap();

    model.revert_all().unwrap();
    assert_eq!(model.extract(0..model.len()).unwrap(), before);
}

#[test]
fn tensor_operations_and_layer_bypass() {
    let dir = tempfile::tempdir().unwrap();
    let model = LiveModel::attach(layered_model(dir.path()), AttachMode::Owned).unwrap();
    let a = model
        .extract(model.tensor("blk.0.ffn_down.weight").unwrap().data_range())
        .unwrap();
    let b = model
        .extract(model.tensor("blk.1.ffn_down.weight").unwrap().data_range())
        .unwrap();
    model
        .swap_tensors("blk.0.ffn_down.weight", "blk.1.ffn_down.weight")
        .unwrap();
    assert_eq!(
        model
            .extract(model.tensor("blk.0.ffn_down.weight").unwrap().data_range())
            .unwrap(),
        b
    );
    model.revert_all().unwrap();
    model
        .clone_tensor("blk.1.attn_norm.weight", "blk.0.attn_norm.weight")
        .unwrap();
    assert!(
        model
            .clone_tensor("flags", "blk.0.attn_output.weight")
            .is_err()
    );
    model.revert_all().unwrap();
    assert_eq!(
        model
            .extract(model.tensor("blk.0.ffn_down.weight").unwrap().data_range())
            .unwrap(),
        a
    );

    let blocks = block_tensors(&model);
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[&1].len(), 3);

    let events = model.subscribe();
    let ids = model.bypass_layer(1).unwrap();
    assert_eq!(ids.len(), 2);
    for name in ["blk.1.attn_output.weight", "blk.1.ffn_down.weight"] {
        let data = model
            .extract(model.tensor(name).unwrap().data_range())
            .unwrap();
        assert!(data.iter().all(|&b| b == 0), "{name}");
    }
    let norm = model
        .extract(model.tensor("blk.1.attn_norm.weight").unwrap().data_range())
        .unwrap();
    assert!(norm.iter().any(|&b| b != 0), "the bypass touched a norm");
    assert!(model.bypass_layer(7).is_err());
    let received: Vec<Event> = events.try_iter().collect();
    assert_eq!(
        received
            .iter()
            .filter(|e| matches!(e, Event::Applied { .. }))
            .count(),
        2
    );
}

#[test]
fn the_skip_set_is_read_without_locks() {
    let skip = std::sync::Arc::new(LayerSkipSet::new());
    let reader = {
        let skip = skip.clone();
        std::thread::spawn(move || (0..100_000).filter(|i| skip.is_skipped(i % 4)).count())
    };
    skip.skip(2);
    skip.skip(3);
    skip.restore(3);
    reader.join().unwrap();
    assert_eq!(skip.skipped(), vec![2]);
    assert!(skip.is_skipped(2) && !skip.is_skipped(3));
}

#[test]
fn the_pointer_table_swaps_patched_copies_in_and_keeps_old_ones_for_their_readers() {
    let dir = tempfile::tempdir().unwrap();
    let model = LiveModel::attach(layered_model(dir.path()), AttachMode::Owned).unwrap();
    let table = memory_tier::TensorTable::from_model(&model, &["blk.0.attn_norm.weight"]).unwrap();
    let old = table.load();
    let report = table
        .patch(
            "blk.0.attn_norm.weight",
            &memory_tier::ValueTransform::Scale(2.0),
        )
        .unwrap();
    assert_eq!(report.n_elements, 64);
    let new = table.get("blk.0.attn_norm.weight").unwrap();
    let old_bytes = &old["blk.0.attn_norm.weight"].bytes;
    // The reader that loaded before the swap still sees the old copy, whole.
    assert_eq!(f32::from_le_bytes(old_bytes[4..8].try_into().unwrap()), 1.0);
    assert_eq!(f32::from_le_bytes(new.bytes[4..8].try_into().unwrap()), 2.0);
    // The region itself is untouched: the table holds copies.
    let region = model
        .extract(model.tensor("blk.0.attn_norm.weight").unwrap().data_range())
        .unwrap();
    assert_eq!(&region[..], &old_bytes[..]);
    assert!(
        table
            .patch("missing", &memory_tier::ValueTransform::Zero)
            .is_err()
    );
}
