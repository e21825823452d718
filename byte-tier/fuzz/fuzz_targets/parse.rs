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
    // What parses must also re-encode, unless a key or tensor name is not UTF-8, which
    // a rewrite refuses to change.
    let mut out = Vec::new();
    let written = GgufWriter::from_gguf(&gguf).write_to(&mut out);
    if gguf.first_name_not_utf8().is_some() {
        assert!(matches!(written, Err(byte_tier::Error::NameNotUtf8 { .. })));
        return;
    }
    written.expect("a parsed file failed to re-encode");
    let again = Gguf::parse(&out).expect("a re-encoded file failed to parse");
    assert_eq!(again.tensors().len(), gguf.tensors().len());
    // Strings come back byte for byte, UTF-8 or not.
    for (a, b) in gguf.metadata().iter().zip(again.metadata()) {
        assert_eq!(a.key, b.key);
        if let (Some(x), Some(y)) = (a.value.as_gguf_str(), b.value.as_gguf_str()) {
            assert_eq!(x, y);
        }
    }
});
