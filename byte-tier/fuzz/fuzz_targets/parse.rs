//! Feeds arbitrary bytes to the GGUF reader. Any panic, out-of-bounds access, oversized
//! allocation or hang is a bug: hostile files must give a typed error.

#![no_main]

use byte_tier::{Gguf, GgufWriter, ValueRef};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(gguf) = Gguf::parse(data) else {
        return;
    };
    // Touch everything a user of a parsed file can reach.
    for entry in gguf.metadata() {
        if let ValueRef::Array(array) = entry.value {
            for value in array.iter() {
                let _ = value.to_owned_value();
            }
            let _ = array.get(array.len().saturating_sub(1));
        }
        let _ = entry.value.to_string();
    }
    for tensor in gguf.tensors() {
        let bytes = gguf.tensor_data(tensor);
        assert_eq!(bytes.len() as u64, tensor.n_bytes);
    }
    // What parses must also re-encode.
    let mut out = Vec::new();
    GgufWriter::from_gguf(&gguf)
        .write_to(&mut out)
        .expect("a parsed file failed to re-encode");
    let again = Gguf::parse(&out).expect("a re-encoded file failed to parse");
    assert_eq!(again.tensors().len(), gguf.tensors().len());
});
