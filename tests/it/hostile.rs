//! Differential hostile files: mutated copies of GGUF files (truncations, bit flips, huge
//! counts and lengths, wrong type ids) are read by ggml's own reader (the C program in
//! `tests/ggml/gguf_reader.c`, linked against llama.cpp's `libggml-base.so`) and by
//! byte-tier's. Nothing panics, and no file that llama.cpp would open is refused by us.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use byte_tier::{
    Array, Error, GgmlType, Gguf, GgufWriter, MappedFile, TensorSpec, Value, ValueType,
};

/// What ggml's reader says of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// `gguf_init_from_file` accepts it and every tensor's data is inside the file.
    Accept,
    /// `gguf_init_from_file` refuses it.
    Refuse,
    /// `gguf_init_from_file` accepts it (it reads no tensor data with `no_alloc`), but
    /// a tensor ends past the end of the file, which llama.cpp's loader refuses next.
    OutOfBounds,
}

/// Compiles the C reader into `dir` against `libggml-base.so`.
fn build_ggml_reader(dir: &Path) -> PathBuf {
    let library = tests::ggml_base_library();
    let library_dir = library.parent().unwrap();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("ggml/gguf_reader.c");
    let binary = dir.join("gguf-reader");
    let output = Command::new("cc")
        .arg("-O1")
        .arg("-o")
        .arg(&binary)
        .arg(&source)
        .arg(format!("-L{}", library_dir.display()))
        .arg("-l:libggml-base.so")
        .arg(format!("-Wl,-rpath,{}", library_dir.display()))
        .output()
        .expect("failed to run cc");
    assert!(
        output.status.success(),
        "compiling {} failed:\n{}",
        source.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    binary
}

/// ggml's verdict on each file, in one run of the reader.
fn ggml_verdicts(reader: &Path, files: &[PathBuf]) -> Vec<Verdict> {
    let mut child = Command::new(reader)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    {
        let mut stdin = child.stdin.take().unwrap();
        for file in files {
            writeln!(stdin, "{}", file.display()).unwrap();
        }
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "the ggml reader failed: {}",
        output.status
    );
    let verdicts: Vec<Verdict> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|line| match line {
            "accept" => Verdict::Accept,
            "refuse" => Verdict::Refuse,
            "out-of-bounds" => Verdict::OutOfBounds,
            other => panic!("the ggml reader printed {other:?}"),
        })
        .collect();
    assert_eq!(verdicts.len(), files.len(), "one verdict per file");
    verdicts
}

/// A small file with every kind of field the mutations aim at: scalars of several
/// types, a boolean and a boolean array, strings with multi-byte characters, a string
/// array, the alignment key, and tensors of a plain, a legacy and a K-quant type.
fn small_model() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.set("general.architecture", "llama")
        .set("general.name", "héllo wörld")
        .set("general.alignment", 32u32)
        .set("llama.context_length", 256u32)
        .set("llama.rope.freq_base", 10000.0f32)
        .set("k.u8", Value::U8(7))
        .set("k.i16", Value::I16(-3))
        .set("k.u64", Value::U64(1 << 40))
        .set("k.i64", Value::I64(-5))
        .set("k.f64", Value::F64(0.25))
        .set("k.flag", true)
        .set(
            "k.flags",
            Array::new(ValueType::Bool, vec![Value::Bool(true), Value::Bool(false)]),
        )
        .set(
            "tokenizer.ggml.tokens",
            Array::of_strings(["<s>", "</s>", "a", "é", "▁the", "日本", "z", ""]),
        )
        .set(
            "tokenizer.ggml.scores",
            Array::new(
                ValueType::F32,
                (0..8).map(|i| Value::F32(i as f32)).collect(),
            ),
        );
    w.add_tensor(TensorSpec::from_bytes(
        "norm.weight",
        vec![8],
        GgmlType::F32,
        vec![0u8; 32],
    ));
    w.add_tensor(TensorSpec::from_bytes(
        "blk.0.attn_q.weight",
        vec![32, 2],
        GgmlType::Q8_0,
        vec![1u8; 68],
    ));
    w.add_tensor(TensorSpec::from_bytes(
        "blk.0.ffn_up.weight",
        vec![256],
        GgmlType::Q4_K,
        vec![2u8; 144],
    ));
    let mut bytes = Vec::new();
    w.write_to(&mut bytes).unwrap();
    bytes
}

/// splitmix64: a fixed, seedable stream, so every run makes the same mutants.
struct Stream(u64);

impl Stream {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// Where the fields of a file are, from our own parse of the original.
struct Fields {
    /// Length and count fields (u64): header counts, key, string and name lengths,
    /// array counts, tensor dimensions.
    lengths: Vec<u64>,
    /// Type id fields (u32): value types, array element types, tensor types.
    types: Vec<u64>,
    /// End of the header (the data section's start).
    header_end: u64,
}

fn fields(gguf: &Gguf<'_>) -> Fields {
    let mut lengths = vec![8, 16];
    let mut types = Vec::new();
    for e in gguf.metadata() {
        lengths.push(e.entry_offset);
        types.push(e.type_offset);
        match e.value.value_type() {
            ValueType::String => lengths.push(e.value_offset),
            ValueType::Array => {
                types.push(e.value_offset);
                lengths.push(e.value_offset + 4);
                if let Some(array) = e.value.as_array()
                    && array.element_type() == ValueType::String
                {
                    // The length fields of the first few elements.
                    let mut position = array.offset();
                    for item in array.iter().take(4) {
                        lengths.push(position);
                        position += 8 + item.as_gguf_str().unwrap().len() as u64;
                    }
                }
            }
            _ => {}
        }
    }
    for t in gguf.tensors() {
        lengths.push(t.info_offset);
        let dims_at = t.info_offset + 8 + t.name.len() as u64 + 4;
        lengths.extend((0..t.dims.len() as u64).map(|d| dims_at + 8 * d));
        types.push(dims_at + 8 * t.dims.len() as u64);
    }
    Fields {
        lengths,
        types,
        header_end: gguf.data_offset(),
    }
}

/// One mutated copy: what was done, and the bytes (the first `bytes.len()` of the file;
/// `len` is the whole file's length, the rest being zeros neither reader looks at).
struct Mutant {
    what: String,
    bytes: Vec<u8>,
    len: u64,
}

/// `count` mutants of `original` (`header` is its first bytes, through the header; `len`
/// its length), a mix of the four kinds.
fn mutants(header: &[u8], len: u64, fields: &Fields, seed: u64, count: usize) -> Vec<Mutant> {
    const HUGE: [u64; 9] = [
        u64::MAX,
        1 << 63,
        1 << 62,
        1 << 40,
        1 << 32,
        0xffff_ffff,
        1 << 30,
        65,
        0,
    ];
    const TYPE_IDS: [u32; 16] = [
        0,
        1,
        6,
        7,
        8,
        9,
        10,
        12,
        13,
        14,
        31,
        41,
        42,
        43,
        0x8000_0000,
        u32::MAX,
    ];
    let mut stream = Stream(seed);
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let mut bytes = header.to_vec();
        let mut file_len = len;
        let what = match i % 10 {
            // Truncation: anywhere in the file, mostly in the header.
            0 => {
                let at = if stream.below(4) == 0 {
                    stream.below(len)
                } else {
                    stream.below(fields.header_end)
                };
                bytes.truncate(at.min(bytes.len() as u64) as usize);
                file_len = at;
                format!("truncated to {at} bytes")
            }
            // A bit flip in the header (strings, counts, types, offsets).
            1..=5 => {
                let at = stream.below(fields.header_end.min(header.len() as u64));
                let bit = stream.below(8);
                bytes[at as usize] ^= 1 << bit;
                format!("bit {bit} of byte {at} flipped")
            }
            // A huge (or zero, or off-by-one) count or length.
            6 | 7 => {
                let at = stream.pick(&fields.lengths) as usize;
                let value = if stream.below(5) == 0 {
                    u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap()).wrapping_add(1)
                } else {
                    stream.pick(&HUGE)
                };
                bytes[at..at + 8].copy_from_slice(&value.to_le_bytes());
                format!("length at {at} set to {value}")
            }
            // A wrong type id.
            _ => {
                let at = stream.pick(&fields.types) as usize;
                let id = stream.pick(&TYPE_IDS);
                bytes[at..at + 4].copy_from_slice(&id.to_le_bytes());
                format!("type at {at} set to {id}")
            }
        };
        out.push(Mutant {
            what,
            bytes,
            len: file_len,
        });
    }
    out
}

/// Writes each mutant (its tail as a hole when it is longer than its bytes).
fn write_mutants(dir: &Path, prefix: &str, mutants: &[Mutant]) -> Vec<PathBuf> {
    mutants
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let path = dir.join(format!("{prefix}-{i:03}.gguf"));
            let file = std::fs::File::create(&path).unwrap();
            (&file).write_all(&m.bytes).unwrap();
            file.set_len(m.len).unwrap();
            path
        })
        .collect()
}

/// Our verdict on a file: `Ok` or the error.
fn our_verdict(path: &Path) -> Result<(), Error> {
    let map = MappedFile::open(path)?;
    map.parse().map(drop)
}

/// Checks ours against ggml's on every file: no refusal of what llama.cpp opens, and a
/// refusal of what it opens only to find data past the end. Returns how many files each
/// reader accepted, so that callers can tell the mutants reach both outcomes.
fn compare(files: &[PathBuf], mutants: &[Mutant], verdicts: &[Verdict]) -> (usize, usize) {
    let mut mismatches = Vec::new();
    let (mut ggml_accepts, mut ggml_refuses) = (0, 0);
    for ((path, mutant), verdict) in files.iter().zip(mutants).zip(verdicts) {
        let ours = our_verdict(path);
        match (verdict, &ours) {
            (Verdict::Accept, Err(e)) => {
                mismatches.push(format!("{}: ggml accepts, we refuse: {e}", mutant.what));
            }
            // llama.cpp refuses these too, once its loader checks the data's bounds; a
            // reader that accepted them would hand out tensor data past the file's end.
            (Verdict::OutOfBounds, Ok(())) => {
                mismatches.push(format!(
                    "{}: a tensor's data ends past the end of the file, and we accept it",
                    mutant.what
                ));
            }
            _ => {}
        }
        match verdict {
            Verdict::Accept => ggml_accepts += 1,
            Verdict::Refuse => ggml_refuses += 1,
            Verdict::OutOfBounds => {}
        }
    }
    assert!(
        mismatches.is_empty(),
        "{} mismatches:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    (ggml_accepts, ggml_refuses)
}

#[test]
fn no_mutant_of_a_small_model_that_ggml_opens_is_refused_by_us() {
    let dir = tempfile::tempdir().unwrap();
    let reader = build_ggml_reader(dir.path());
    let original = small_model();
    let gguf = Gguf::parse(&original).unwrap();
    let fields = fields(&gguf);
    let mutants = mutants(&original, original.len() as u64, &fields, 0x5eed, 400);
    let files = write_mutants(dir.path(), "small", &mutants);
    let verdicts = ggml_verdicts(&reader, &files);
    let (accepts, refuses) = compare(&files, &mutants, &verdicts);
    // The mutants reach both sides of ggml's reader, so the comparison means something.
    assert!(
        accepts >= 40 && refuses >= 40,
        "ggml accepts {accepts}, refuses {refuses}"
    );
    // And the original itself is accepted by both.
    let unchanged = write_mutants(
        dir.path(),
        "original",
        &[Mutant {
            what: "unchanged".into(),
            bytes: original.clone(),
            len: original.len() as u64,
        }],
    );
    assert_eq!(ggml_verdicts(&reader, &unchanged), [Verdict::Accept]);
}

#[test]
fn no_mutant_of_the_real_models_header_that_ggml_opens_is_refused_by_us() {
    let dir = tempfile::tempdir().unwrap();
    let reader = build_ggml_reader(dir.path());
    let map = MappedFile::open(tests::real_model()).unwrap();
    let gguf = map.parse().unwrap();
    let fields = fields(&gguf);
    let header = &map.bytes()[..gguf.data_offset() as usize];
    // The tensor data is left as a hole: neither reader reads it.
    let mutants = mutants(header, gguf.file_len(), &fields, 0x9e11, 20);
    let files = write_mutants(dir.path(), "real", &mutants);
    let verdicts = ggml_verdicts(&reader, &files);
    let (accepts, _) = compare(&files, &mutants, &verdicts);
    assert!(accepts > 0, "ggml accepted no mutant of the real model");
}
