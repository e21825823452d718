//! A set of two shards attached live: patches go to the shard that holds their tensor,
//! revert there, and a transaction that would span shards is refused.

use std::path::{Path, PathBuf};

use byte_tier::split::{SplitLimit, SplitOptions, SplitPlan};
use byte_tier::{GgmlType, GgufWriter, MappedFile, TensorSpec};

use super::*;
use crate::patch::{Payload, ValueTransform};

/// A file of four F32 tensors of 64 values, split into two shards of two tensors;
/// returns the shards.
fn two_shards(dir: &Path) -> Vec<PathBuf> {
    let mut writer = GgufWriter::new();
    writer.set("general.architecture", "llama");
    for t in 0..4u32 {
        let bytes: Vec<u8> = (0..64u32)
            .flat_map(|i| ((t * 100 + i) as f32 + 1.0).to_le_bytes())
            .collect();
        writer.add_tensor(TensorSpec::from_bytes(
            format!("t{t}"),
            vec![64],
            GgmlType::F32,
            bytes,
        ));
    }
    let source = dir.join("model.gguf");
    writer.write_to_path(&source).unwrap();
    let map = MappedFile::open(&source).unwrap();
    let gguf = map.parse().unwrap();
    let options = SplitOptions {
        limit: SplitLimit::Tensors(2),
        no_tensor_first_split: false,
    };
    SplitPlan::new(&gguf, &dir.join("set"), &options)
        .unwrap()
        .write(&gguf, &source)
        .unwrap()
        .into_iter()
        .map(|o| o.path)
        .collect()
}

fn scale(name: &str, tensor: &str, factor: f32) -> MemoryPatch {
    MemoryPatch::new(
        name,
        PatchTarget::Tensor {
            name: tensor.into(),
            elements: None,
        },
        Payload::Transform(ValueTransform::Scale(factor)),
    )
}

#[test]
fn a_patch_goes_to_the_shard_that_holds_its_tensor_and_reverts_there() {
    let dir = tempfile::tempdir().unwrap();
    let shards = two_shards(dir.path());
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    // Either shard attaches the whole set.
    let set = LiveSet::attach(&shards[1], AttachMode::Shared).unwrap();
    assert_eq!(set.files().len(), 2);
    assert!(set.single().is_none());
    assert_eq!(set.size(), (256, 1024));
    assert_eq!(set.first().path(), Some(shards[0].as_path()));

    let reports = set
        .apply_reported(vec![scale("double", "t3", 2.0)])
        .unwrap();
    let id = reports[0].id;
    assert!(Arc::ptr_eq(set.holder("t3").unwrap(), &set.files()[1]));
    assert!(Arc::ptr_eq(
        set.holder_of_patch(id).unwrap(),
        &set.files()[1]
    ));
    assert_eq!(set.applied_patches()[0].0, 1);
    assert!(std::fs::read(&shards[0]).unwrap() == before[0]);
    let map = MappedFile::open(&shards[1]).unwrap();
    let gguf = map.parse().unwrap();
    let data = gguf.tensor_data(gguf.tensor("t3").unwrap());
    assert_eq!(f32::from_le_bytes(data[..4].try_into().unwrap()), 602.0);

    set.revert(id).unwrap();
    assert!(std::fs::read(&shards[1]).unwrap() == before[1]);
    assert!(set.applied().is_empty());
    assert!(matches!(set.revert(id), Err(Error::NoSuchPatch(_))));
}

#[test]
fn a_transaction_across_shards_or_by_byte_range_is_refused_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let shards = two_shards(dir.path());
    let before: Vec<Vec<u8>> = shards.iter().map(|s| std::fs::read(s).unwrap()).collect();
    let set = LiveSet::attach(&shards[0], AttachMode::Shared).unwrap();
    let spanning = set.apply_reported(vec![scale("a", "t0", 2.0), scale("b", "t3", 2.0)]);
    assert!(
        matches!(&spanning, Err(Error::InvalidPatch { patch, .. }) if patch == "b"),
        "{spanning:?}"
    );
    let raw = MemoryPatch::new("raw", PatchTarget::Raw(0..4), Payload::Bytes(vec![0; 4]));
    assert!(matches!(
        set.apply_reported(vec![raw]),
        Err(Error::InvalidPatch { .. })
    ));
    assert!(matches!(
        set.apply_reported(vec![scale("c", "t9", 2.0)]),
        Err(Error::NoSuchTensor(_))
    ));
    for (shard, bytes) in shards.iter().zip(&before) {
        assert!(&std::fs::read(shard).unwrap() == bytes);
    }
}
