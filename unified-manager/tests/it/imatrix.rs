//! `hotpatch requantize --imatrix` against `llama-quantize --imatrix`, byte for byte per
//! tensor, with importance matrices that `llama-imatrix` computes in both of its formats;
//! and matrices that do not fit (truncated, of another model) refused with nothing
//! written.
//!
//! The model is the real one cut to its first block with its weight matrices in F16
//! (`hotpatch optimize`), so that llama-imatrix and llama-quantize run in seconds.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use byte_tier::{GgmlType, MappedFile};

const HOTPATCH: &str = env!("CARGO_BIN_EXE_hotpatch");

/// The weight matrices of a block.
const MATRICES: &str = r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight";
/// The matrices whose rows (1024 and 2048 values) are whole 256-value super-blocks;
/// the others (640) are not, and llama-quantize gives them a fallback type.
const SUPER_BLOCK_ROWS: &str = r"blk\.\d+\.(attn_output|ffn_down)\.weight";

fn run(program: &Path, args: &[&OsStr]) -> Output {
    Command::new(program).args(args).output().unwrap()
}

fn run_ok(program: &Path, args: &[&OsStr]) -> String {
    let output = run(program, args);
    assert!(
        output.status.success(),
        "{} {args:?} failed: {}{}",
        program.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn os<'a>(items: &[&'a str]) -> Vec<&'a OsStr> {
    items.iter().map(|s| OsStr::new(*s)).collect()
}

struct Setup {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    model: PathBuf,
    gguf_matrix: PathBuf,
    dat_matrix: PathBuf,
}

/// The one-block F16 model and its importance matrices in both formats, made for each
/// test (the test runner gives each test its own process, so nothing would be shared;
/// owned, the folder is removed when the test ends, where a static one never was).
fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_owned();
    let model = dir.join("small.gguf");
    let real = tests::real_model();
    let prune: Vec<String> = (1..18).map(|i| i.to_string()).collect();
    let prune = prune.join(",");
    let mut args = vec![OsStr::new("optimize"), real.as_os_str()];
    args.extend(os(&[
        "--prune",
        &prune,
        "--tensors",
        MATRICES,
        "--to",
        "F16",
        "-o",
    ]));
    args.push(model.as_os_str());
    run_ok(Path::new(HOTPATCH), &args);
    // A short text of common words: two chunks of 128 tokens.
    let words = "the quick brown fox jumps over a lazy dog while seven wizards quietly \
                     hex jolly bright zebras near the old river bank and every morning";
    let text: Vec<&str> = words.split_whitespace().cycle().take(700).collect();
    let text_path = dir.join("text.txt");
    std::fs::write(&text_path, text.join(" ")).unwrap();
    let imatrix = tests::llama_tool("llama-imatrix");
    let gguf_matrix = dir.join("imatrix.gguf");
    let dat_matrix = dir.join("imatrix.dat");
    for (out, format) in [(&gguf_matrix, "gguf"), (&dat_matrix, "dat")] {
        let mut args = vec![OsStr::new("-m"), model.as_os_str(), "-f".as_ref()];
        args.push(text_path.as_os_str());
        args.extend(os(&["-c", "128", "--chunks", "2", "-t", "2", "--no-ppl"]));
        args.extend(os(&["--output-format", format, "-o"]));
        args.push(out.as_os_str());
        run_ok(&imatrix, &args);
    }
    Setup {
        _dir: tmp,
        dir,
        model,
        gguf_matrix,
        dat_matrix,
    }
}

/// Tensors of `ours` converted to `ggml_type`, each compared with the same tensor of
/// `theirs`; returns the names that are identical, and panics naming any that is not.
fn same_tensors(ours: &Path, theirs: &Path, ggml_type: GgmlType) -> Vec<String> {
    let (a, b) = (
        MappedFile::open(ours).unwrap(),
        MappedFile::open(theirs).unwrap(),
    );
    let (a, b) = (a.parse().unwrap(), b.parse().unwrap());
    let mut same = Vec::new();
    for t in a.tensors().iter().filter(|t| t.ggml_type == ggml_type) {
        let u = b.require_tensor(&t.name).unwrap();
        assert_eq!(
            u.ggml_type, ggml_type,
            "{}: llama-quantize chose another type",
            t.name
        );
        let (x, y) = (a.tensor_data(t), b.tensor_data(u));
        let first = x.iter().zip(y).position(|(p, q)| p != q);
        assert!(
            x.len() == y.len() && first.is_none(),
            "{} ({ggml_type}) differs from llama-quantize's at byte {first:?} of {}",
            t.name,
            x.len()
        );
        same.push(t.name.clone());
    }
    same
}

#[test]
fn requantize_with_an_imatrix_gives_llama_quantize_bytes_for_every_weighted_type() {
    let s = setup();
    let quantize = tests::llama_tool("llama-quantize");
    let types = [
        "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS",
    ];
    for (i, name) in types.into_iter().enumerate() {
        let ggml_type = GgmlType::from_name(name).unwrap();
        let theirs = s.dir.join(format!("theirs-{name}.gguf"));
        let ours = s.dir.join(format!("ours-{name}.gguf"));
        let mut args = os(&["--imatrix"]);
        args.push(s.gguf_matrix.as_os_str());
        args.extend(os(&["--pure", "--token-embedding-type", "q8_0"]));
        args.extend([s.model.as_os_str(), theirs.as_os_str()]);
        args.extend(os(&[name, "2"]));
        run_ok(&quantize, &args);
        // Both of llama-imatrix's formats give the same weights: alternate them.
        let matrix = if i % 2 == 0 {
            &s.gguf_matrix
        } else {
            &s.dat_matrix
        };
        let super_block = ggml_type.block_len() == 256;
        let select = if super_block {
            SUPER_BLOCK_ROWS
        } else {
            MATRICES
        };
        let mut args = vec![OsStr::new("requantize"), s.model.as_os_str()];
        args.extend(os(&["--tensors", select, "--type", name, "--imatrix"]));
        args.extend([matrix.as_os_str(), "-o".as_ref(), ours.as_os_str()]);
        let stdout = run_ok(Path::new(HOTPATCH), &args);
        assert!(stdout.contains("importance-weighted"), "{stdout}");
        let same = same_tensors(&ours, &theirs, ggml_type);
        assert_eq!(
            same.len(),
            if super_block { 2 } else { 7 },
            "{name}: {same:?}"
        );
    }
}

#[test]
fn weights_change_the_bytes_and_unweighted_requantize_is_unchanged() {
    let s = setup();
    let plain = s.dir.join("plain-q4_k.gguf");
    let weighted = s.dir.join("weighted-q4_k.gguf");
    for (out, matrix) in [(&plain, None), (&weighted, Some(&s.gguf_matrix))] {
        let mut args = vec![OsStr::new("requantize"), s.model.as_os_str()];
        args.extend(os(&["--tensors", SUPER_BLOCK_ROWS, "--type", "Q4_K", "-o"]));
        args.push(out.as_os_str());
        if let Some(m) = matrix {
            args.extend([OsStr::new("--imatrix"), m.as_os_str()]);
        }
        run_ok(Path::new(HOTPATCH), &args);
    }
    let (a, b) = (
        MappedFile::open(&plain).unwrap(),
        MappedFile::open(&weighted).unwrap(),
    );
    let (a, b) = (a.parse().unwrap(), b.parse().unwrap());
    let t = a.require_tensor("blk.0.ffn_down.weight").unwrap();
    let u = b.require_tensor("blk.0.ffn_down.weight").unwrap();
    assert_ne!(a.tensor_data(t), b.tensor_data(u));
    // Without a matrix the bytes are ggml's reference quantizer's, as before.
    let source = MappedFile::open(&s.model).unwrap();
    let source = source.parse().unwrap();
    let f16 = source.require_tensor("blk.0.ffn_down.weight").unwrap();
    let values = byte_tier::codec::dequantize(f16.ggml_type, source.tensor_data(f16)).unwrap();
    let reference = byte_tier::codec::quantize(GgmlType::Q4_K, &values).unwrap();
    assert_eq!(a.tensor_data(t), reference.as_slice());
}

/// Runs a requantization that must fail; checks that it names `expected` and that the
/// output was not written.
fn refused(s: &Setup, matrix: &Path, expected: &str) {
    let out = s.dir.join("refused.gguf");
    let mut args = vec![OsStr::new("requantize"), s.model.as_os_str()];
    args.extend(os(&["--tensors", MATRICES, "--type", "Q4_0", "--imatrix"]));
    args.extend([matrix.as_os_str(), "-o".as_ref(), out.as_os_str()]);
    let output = run(Path::new(HOTPATCH), &args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");
    assert!(!out.exists(), "{} was written", out.display());
}

#[test]
fn truncated_and_foreign_imatrices_are_refused_and_nothing_is_written() {
    let s = setup();
    for source in [&s.gguf_matrix, &s.dat_matrix] {
        let bytes = std::fs::read(source).unwrap();
        let cut = s.dir.join("cut");
        std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
        refused(&s, &cut, "");
    }
    // A legacy matrix whose entry has the wrong number of columns for the tensor.
    let legacy = |name: &str, n: i32| {
        let mut b = 1i32.to_le_bytes().to_vec();
        b.extend((name.len() as i32).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend(1i32.to_le_bytes());
        b.extend(n.to_le_bytes());
        for _ in 0..n {
            b.extend(1.0f32.to_le_bytes());
        }
        b
    };
    let foreign = s.dir.join("foreign.dat");
    std::fs::write(&foreign, legacy("blk.0.attn_q.weight", 4096)).unwrap();
    refused(&s, &foreign, "does not fit the model");
    std::fs::write(&foreign, legacy("blk.40.attn_q.weight", 640)).unwrap();
    refused(&s, &foreign, "the model has no tensor of that name");
    // The model itself is GGUF but no importance matrix.
    refused(&s, &s.model, "imatrix.datasets is missing");
}

#[test]
fn patch_with_an_imatrix_requantizes_as_llama_quantize_does() {
    // A Q4_K tensor set to the F16 model's values through `hotpatch patch --imatrix`
    // gets llama-quantize --imatrix's bytes for that tensor; the same patch without the
    // matrix gets llama-quantize's bytes without it.
    let s = setup();
    let quantize = tests::llama_tool("llama-quantize");
    let name = "blk.0.ffn_down.weight";
    let quantized = |label: &str, matrix: Option<&PathBuf>| {
        let out = s.dir.join(format!("patch-theirs-{label}.gguf"));
        let mut args = Vec::new();
        if let Some(m) = matrix {
            args.extend([OsStr::new("--imatrix"), m.as_os_str()]);
        }
        args.extend(os(&["--pure", "--token-embedding-type", "q8_0"]));
        args.extend([s.model.as_os_str(), out.as_os_str()]);
        args.extend(os(&["Q4_K", "2"]));
        run_ok(&quantize, &args);
        out
    };
    let weighted = quantized("weighted", Some(&s.gguf_matrix));
    let plain = quantized("plain", None);
    let tensor_bytes = |path: &Path| {
        let file = MappedFile::open(path).unwrap();
        let gguf = file.parse().unwrap();
        let t = gguf.require_tensor(name).unwrap();
        assert_eq!(t.ggml_type, GgmlType::Q4_K);
        gguf.tensor_data(t).to_vec()
    };
    assert_ne!(tensor_bytes(&weighted), tensor_bytes(&plain));

    let values = s.dir.join("ffn_down.npy");
    {
        let file = MappedFile::open(&s.model).unwrap();
        let gguf = file.parse().unwrap();
        let t = gguf.require_tensor(name).unwrap();
        let decoded = byte_tier::codec::dequantize(t.ggml_type, gguf.tensor_data(t)).unwrap();
        byte_tier::codec::write_tensor_npy(&values, &t.dims, &decoded).unwrap();
    }
    // Start from the other side's file each time, so that the bytes must change.
    for (start, matrix, want) in [
        (&plain, Some(&s.dat_matrix), &weighted),
        (&weighted, None, &plain),
    ] {
        let ours = s.dir.join("patch-ours.gguf");
        std::fs::copy(start, &ours).unwrap();
        let mut args = vec![OsStr::new("patch"), ours.as_os_str()];
        args.extend(os(&["--tensor", name, "--set-npy"]));
        args.push(values.as_os_str());
        if let Some(m) = matrix {
            args.extend([OsStr::new("--imatrix"), m.as_os_str()]);
        }
        run_ok(Path::new(HOTPATCH), &args);
        assert!(
            tensor_bytes(&ours) == tensor_bytes(want),
            "patch with matrix {matrix:?} differs from llama-quantize"
        );
        let _ = std::fs::remove_file(byte_tier::journal_path(&ours));
    }

    // A tensor the matrix has no weights for is refused, naming it, and nothing changes.
    let ours = s.dir.join("patch-refused.gguf");
    std::fs::copy(&plain, &ours).unwrap();
    let before = std::fs::read(&ours).unwrap();
    let mut args = vec![OsStr::new("patch"), ours.as_os_str()];
    args.extend(os(&[
        "--tensor",
        "token_embd.weight",
        "--offset",
        "0.01",
        "--imatrix",
    ]));
    args.push(s.gguf_matrix.as_os_str());
    let output = run(Path::new(HOTPATCH), &args);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no importance weights for token_embd.weight"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&ours).unwrap(), before);
}

/// gguf-py's values of every tensor of type `type_name` in `file`, each compared with
/// the `.npy` that `hotpatch tensor export` wrote to `dir/NAME.npy`, bit for bit; prints
/// the names compared.
const EXPORTS_MATCH_GGUF_PY: &str = r#"
import sys, numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
path, type_name, folder = sys.argv[1], sys.argv[2], sys.argv[3]
for t in GGUFReader(path).tensors:
    if t.tensor_type.name != type_name:
        continue
    theirs = dequantize(t.data, t.tensor_type).astype(np.float32).reshape(-1)
    ours = np.load(f"{folder}/{t.name}.npy").reshape(-1)
    if theirs.view(np.uint32).tobytes() != ours.view(np.uint32).tobytes():
        bad = int(np.argmax(theirs.view(np.uint32) != ours.view(np.uint32)))
        sys.exit(f"{t.name}: value {bad} is {ours[bad]!r} here, {theirs[bad]!r} in gguf-py")
    print(t.name)
"#;

#[test]
fn grid_iq_files_made_by_llama_quantize_export_as_gguf_py_requantize_to_its_bytes_and_load() {
    let s = setup();
    let quantize = tests::llama_tool("llama-quantize");
    // Each type, and the llama-quantize file type whose tensors are all of it with
    // --pure (its IQ2_S file type is made of IQ2_XS tensors; IQ2_M's are IQ2_S).
    for (name, file_type) in [
        ("IQ1_S", "IQ1_S"),
        ("IQ1_M", "IQ1_M"),
        ("IQ2_XXS", "IQ2_XXS"),
        ("IQ2_XS", "IQ2_XS"),
        ("IQ2_S", "IQ2_M"),
        ("IQ3_XXS", "IQ3_XXS"),
        ("IQ3_S", "IQ3_S"),
    ] {
        let ggml_type = GgmlType::from_name(name).unwrap();
        let theirs = s.dir.join(format!("theirs-{name}.gguf"));
        let mut args = os(&["--imatrix"]);
        args.push(s.gguf_matrix.as_os_str());
        args.extend(os(&["--pure", "--token-embedding-type", "q8_0"]));
        args.extend([s.model.as_os_str(), theirs.as_os_str()]);
        args.extend(os(&[file_type, "2"]));
        run_ok(&quantize, &args);

        // Every tensor llama-quantize wrote in the type exports as gguf-py decodes it.
        let exports = s.dir.join(format!("export-{name}"));
        std::fs::create_dir_all(&exports).unwrap();
        let names: Vec<String> = {
            let map = MappedFile::open(&theirs).unwrap();
            let gguf = map.parse().unwrap();
            gguf.tensors()
                .iter()
                .filter(|t| t.ggml_type == ggml_type)
                .map(|t| t.name.clone())
                .collect()
        };
        assert!(
            !names.is_empty(),
            "{name}: llama-quantize wrote no tensor of it"
        );
        for tensor in &names {
            let npy = exports.join(format!("{tensor}.npy"));
            let mut args = vec![OsStr::new("tensor"), "export".as_ref(), theirs.as_os_str()];
            args.extend([OsStr::new(tensor.as_str()), "-o".as_ref(), npy.as_os_str()]);
            run_ok(Path::new(HOTPATCH), &args);
        }
        let checked = tests::run_python(
            EXPORTS_MATCH_GGUF_PY,
            &[theirs.as_os_str(), OsStr::new(name), exports.as_os_str()],
        );
        assert_eq!(
            String::from_utf8_lossy(&checked).lines().count(),
            names.len(),
            "{name}"
        );

        // Requantized from the F16 model with the same matrix, our bytes are theirs.
        let ours = s.dir.join(format!("ours-{name}.gguf"));
        let mut args = vec![OsStr::new("requantize"), s.model.as_os_str()];
        args.extend(os(&[
            "--tensors",
            SUPER_BLOCK_ROWS,
            "--type",
            name,
            "--imatrix",
        ]));
        args.extend([s.dat_matrix.as_os_str(), "-o".as_ref(), ours.as_os_str()]);
        run_ok(Path::new(HOTPATCH), &args);
        assert_eq!(same_tensors(&ours, &theirs, ggml_type).len(), 2, "{name}");

        // And the result loads and answers in llama-server.
        let server = tests::LlamaServer::start(&ours, &[]);
        let body = r#"{"prompt": "Once upon a time", "n_predict": 4, "temperature": 0}"#;
        let (status, answer) =
            tests::http_request(server.port, "POST", "/completion", Some(body)).unwrap();
        assert_eq!(status, 200, "{name}: {answer}");
    }
}

#[test]
fn the_types_ggml_quantizes_only_with_weights_are_refused_without_a_matrix() {
    let s = setup();
    for name in ["IQ1_S", "IQ2_XXS", "IQ2_XS"] {
        let out = s.dir.join(format!("unweighted-{name}.gguf"));
        let mut args = vec![OsStr::new("requantize"), s.model.as_os_str()];
        args.extend(os(&["--tensors", SUPER_BLOCK_ROWS, "--type", name, "-o"]));
        args.push(out.as_os_str());
        let output = run(Path::new(HOTPATCH), &args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}");
        assert!(
            stderr.contains("only with importance weights") && stderr.contains("--imatrix"),
            "{name}: {stderr}"
        );
        assert!(!out.exists(), "{name}: wrote {}", out.display());
    }
}

#[test]
fn preset_apply_with_an_imatrix_requantizes_as_patch_with_it_does() {
    let s = setup();
    let name = "blk.0.ffn_down.weight";
    let base = s.dir.join("preset-base.gguf");
    let mut args = vec![OsStr::new("requantize"), s.model.as_os_str()];
    args.extend(os(&["--tensors", SUPER_BLOCK_ROWS, "--type", "Q4_K", "-o"]));
    args.push(base.as_os_str());
    run_ok(Path::new(HOTPATCH), &args);
    let config = s.dir.join("preset-config");
    let preset = s.dir.join("nudge.toml");
    std::fs::write(
        &preset,
        format!(
            "name = \"nudge\"\nversion = 1\n\n[[memory_patch]]\nname = \"nudge-down\"\n\
             tensor = \"{name}\"\ntransform = {{ offset = 0.001 }}\n"
        ),
    )
    .unwrap();
    let mut args = os(&["preset", "save"]);
    args.extend([
        preset.as_os_str(),
        "--config-dir".as_ref(),
        config.as_os_str(),
    ]);
    run_ok(Path::new(HOTPATCH), &args);
    let tensor_bytes = |path: &Path| {
        let file = MappedFile::open(path).unwrap();
        let gguf = file.parse().unwrap();
        let t = gguf.require_tensor(name).unwrap();
        gguf.tensor_data(t).to_vec()
    };
    let copy = |label: &str| {
        let path = s.dir.join(format!("preset-{label}.gguf"));
        std::fs::copy(&base, &path).unwrap();
        path
    };
    let (patched, weighted, plain) = (copy("patched"), copy("weighted"), copy("plain"));
    let mut args = vec![OsStr::new("patch"), patched.as_os_str()];
    args.extend(os(&["--tensor", name, "--offset", "0.001", "--imatrix"]));
    args.push(s.gguf_matrix.as_os_str());
    run_ok(Path::new(HOTPATCH), &args);
    for (file, matrix) in [(&weighted, Some(&s.dat_matrix)), (&plain, None)] {
        let mut args = os(&["preset", "apply", "nudge"]);
        args.extend([
            file.as_os_str(),
            "--config-dir".as_ref(),
            config.as_os_str(),
        ]);
        if let Some(m) = matrix {
            args.extend([OsStr::new("--imatrix"), m.as_os_str()]);
        }
        run_ok(Path::new(HOTPATCH), &args);
    }
    assert!(tensor_bytes(&weighted) == tensor_bytes(&patched));
    assert!(tensor_bytes(&plain) != tensor_bytes(&weighted));
    assert!(tensor_bytes(&plain) != tensor_bytes(&base));
}

#[test]
fn safety_repairs_a_type_ggml_quantizes_only_with_weights_given_the_imatrix() {
    use std::os::unix::fs::FileExt;
    let s = setup();
    let file = s.dir.join("iq2_xxs.gguf");
    let mut args = os(&["--imatrix"]);
    args.push(s.gguf_matrix.as_os_str());
    args.extend(os(&["--pure", "--token-embedding-type", "q8_0"]));
    args.extend([s.model.as_os_str(), file.as_os_str()]);
    args.extend(os(&["IQ2_XXS", "2"]));
    run_ok(&tests::llama_tool("llama-quantize"), &args);

    // A NaN scale (f16 0x7e00) in the first block of row 1 of the first ffn_down.
    let (name, dims, row_at) = {
        let map = MappedFile::open(&file).unwrap();
        let gguf = map.parse().unwrap();
        let t = gguf
            .tensors()
            .iter()
            .find(|t| t.name.ends_with("ffn_down.weight"))
            .unwrap();
        assert_eq!(t.ggml_type, GgmlType::IQ2_XXS);
        let row_bytes = GgmlType::IQ2_XXS.bytes_for(t.dims[0]).unwrap();
        (t.name.clone(), t.dims.clone(), t.data_offset + row_bytes)
    };
    let handle = std::fs::OpenOptions::new().write(true).open(&file).unwrap();
    handle.write_all_at(&[0x00, 0x7e], row_at).unwrap();
    drop(handle);
    let planted = std::fs::read(&file).unwrap();
    let path = file.to_str().unwrap();

    // Without the matrix the tensor cannot be written back: it is reported, and kept.
    let output = run(
        Path::new(HOTPATCH),
        &os(&["safety", path, "--repair", "zero"]),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("--imatrix"), "{stdout}");
    assert!(std::fs::read(&file).unwrap() == planted);

    // With it, the row is requantized with its weights, and only the fixed block moves.
    let mut args = os(&["safety", path, "--repair", "zero", "--json", "--imatrix"]);
    args.push(s.dat_matrix.as_os_str());
    let report: serde_json::Value =
        serde_json::from_str(&run_ok(Path::new(HOTPATCH), &args)).unwrap();
    let repaired = std::fs::read(&file).unwrap();
    let block = GgmlType::IQ2_XXS.block_bytes() as usize;
    let row_len = dims[0] as usize;
    let row_bytes = GgmlType::IQ2_XXS.bytes_for(dims[0]).unwrap() as usize;
    let at = row_at as usize;
    let mut row =
        byte_tier::codec::dequantize(GgmlType::IQ2_XXS, &planted[at..at + row_bytes]).unwrap();
    row.iter_mut().filter(|v| v.is_nan()).for_each(|v| *v = 0.0);
    let matrix = byte_tier::imatrix::ImportanceMatrix::read(&s.dat_matrix).unwrap();
    let weights = matrix.get(&name).unwrap();
    let expected =
        byte_tier::codec::quantize_weighted(GgmlType::IQ2_XXS, &row, row_len, weights).unwrap();
    assert_eq!(&repaired[at..at + block], &expected[..block]);
    assert!(repaired[..at] == planted[..at] && repaired[at + block..] == planted[at + block..]);

    let transaction = report["undo"]["journal_transaction"].as_u64().unwrap();
    run_ok(
        Path::new(HOTPATCH),
        &os(&["revert", path, &transaction.to_string()]),
    );
    assert!(std::fs::read(&file).unwrap() == planted);
}
