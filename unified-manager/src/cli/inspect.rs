//! `hotpatch inspect`: metadata and tensor table, as text or JSON.

use std::io::{self, BufWriter, Write};
use std::path::PathBuf;

use anyhow::Context;
use byte_tier::{ArrayRef, Gguf, GgufStr, MappedFile, MetadataEntry, ValueRef, ValueType};
use serde_json::{Map, Value as Json, json};

/// Arrays longer than this are summarized unless `--full` is given.
const ARRAY_SUMMARY_LEN: u64 = 16;
/// Elements shown of a summarized array.
const ARRAY_HEAD_LEN: usize = 8;
/// Strings longer than this (in characters) are cut in text output unless `--full`.
const STRING_SUMMARY_LEN: usize = 80;

/// Arguments of `hotpatch inspect`.
#[derive(Debug, clap::Args)]
pub struct InspectArgs {
    /// The GGUF file.
    pub file: PathBuf,
    /// Print JSON: the fields of gguf-dump's `--json`, plus value and data offsets.
    #[arg(long)]
    pub json: bool,
    /// Print long arrays and strings in full instead of summarizing them.
    #[arg(long)]
    pub full: bool,
}

pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    if let Some(set) = byte_tier::split::open_set_of(&args.file)? {
        return run_set(args, &set);
    }
    let file = MappedFile::open(&args.file)?;
    let gguf = file
        .parse()
        .with_context(|| format!("parse {}", args.file.display()))?;
    let stdout = io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    if args.json {
        let report = json_report(&args.file.display().to_string(), &gguf, args.full);
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        write_text(&mut out, &args.file.display().to_string(), &gguf, args.full)?;
    }
    out.flush()?;
    Ok(())
}

/// A shard set: one report per shard, in order (the general metadata is in the first);
/// JSON holds them under `shards`.
fn run_set(args: &InspectArgs, set: &byte_tier::split::ShardSet) -> anyhow::Result<()> {
    let shards = set.parse_all()?;
    let stdout = io::stdout();
    let mut out = BufWriter::with_capacity(1 << 16, stdout.lock());
    if args.json {
        let reports: Vec<Json> = set
            .files()
            .iter()
            .zip(&shards)
            .map(|(file, gguf)| json_report(&file.path().display().to_string(), gguf, args.full))
            .collect();
        let report = json!({
            "filename": args.file.display().to_string(),
            "n_shards": shards.len(),
            "n_tensors": set.n_tensors(),
            "shards": reports,
        });
        serde_json::to_writer(&mut out, &report)?;
        writeln!(out)?;
    } else {
        writeln!(
            out,
            "shard set {}: {} shards, {} tensors\n",
            set.prefix().display(),
            shards.len(),
            set.n_tensors()
        )?;
        for (file, gguf) in set.files().iter().zip(&shards) {
            write_text(
                &mut out,
                &file.path().display().to_string(),
                gguf,
                args.full,
            )?;
            writeln!(out)?;
        }
    }
    out.flush()?;
    Ok(())
}

/// The nested element types of an array, following its first element, as gguf-py
/// reports them (`["ARRAY", "INT32"]` for an array of arrays of INT32).
fn array_types(array: &ArrayRef<'_>) -> Vec<ValueType> {
    let mut types = vec![array.element_type()];
    let mut current = *array;
    while current.element_type() == ValueType::Array {
        match current.iter().next().and_then(|v| v.as_array()) {
            Some(inner) => {
                types.push(inner.element_type());
                current = inner;
            }
            None => break,
        }
    }
    types
}

pub fn pretty_type(value: &ValueRef<'_>) -> String {
    match value {
        ValueRef::Array(a) => {
            let types = array_types(a);
            let inner = types.last().map_or("?", |t| t.name());
            format!(
                "{}{inner}; {}{}",
                "[".repeat(types.len()),
                a.len(),
                "]".repeat(types.len())
            )
        }
        other => other.value_type().name().to_owned(),
    }
}

pub fn to_json(value: &ValueRef<'_>) -> Json {
    match *value {
        ValueRef::U8(v) => json!(v),
        ValueRef::I8(v) => json!(v),
        ValueRef::U16(v) => json!(v),
        ValueRef::I16(v) => json!(v),
        ValueRef::U32(v) => json!(v),
        ValueRef::I32(v) => json!(v),
        ValueRef::F32(v) => json!(f64::from(v)),
        ValueRef::Bool(v) => json!(v),
        ValueRef::String(v) => string_json(v),
        ValueRef::U64(v) => json!(v),
        ValueRef::I64(v) => json!(v),
        ValueRef::F64(v) => json!(v),
        ValueRef::Array(a) => Json::Array(a.iter().map(|v| to_json(&v)).collect()),
    }
}

/// A string as JSON: the text when it is UTF-8 (gguf-dump's form), otherwise the text
/// with U+FFFD for the bad bytes and every byte in hexadecimal.
pub fn string_json(s: GgufStr<'_>) -> Json {
    match s.as_str() {
        Some(text) => json!(text),
        None => json!({
            "lossy": s.to_string_lossy(),
            "hex": byte_tier::ops::to_hex(s.as_bytes()),
        }),
    }
}

fn metadata_json(index: usize, entry: &MetadataEntry<'_>, full: bool) -> Json {
    let mut fields = Map::new();
    fields.insert("index".into(), json!(index));
    fields.insert("type".into(), json!(entry.value.value_type().name()));
    fields.insert("offset".into(), json!(entry.entry_offset));
    fields.insert("value_offset".into(), json!(entry.value_offset));
    fields.insert("value_len".into(), json!(entry.value_len));
    match entry.value {
        ValueRef::Array(a) => {
            let types: Vec<&str> = array_types(&a).iter().map(|t| t.name()).collect();
            fields.insert("array_types".into(), json!(types));
            fields.insert("len".into(), json!(a.len()));
            if full || a.len() <= ARRAY_SUMMARY_LEN {
                fields.insert("value".into(), to_json(&entry.value));
            } else {
                let head: Vec<Json> = a.iter().take(ARRAY_HEAD_LEN).map(|v| to_json(&v)).collect();
                fields.insert("head".into(), Json::Array(head));
                fields.insert("truncated".into(), json!(true));
            }
        }
        value => {
            fields.insert("value".into(), to_json(&value));
        }
    }
    Json::Object(fields)
}

/// The JSON report: gguf-dump's `--json` layout (metadata keyed by name, with the three
/// `GGUF.*` header fields first; tensors keyed by name, `offset` being the tensor info's
/// offset as gguf-dump gives it) plus absolute data offsets and sizes.
fn json_report(filename: &str, gguf: &Gguf<'_>, full: bool) -> Json {
    let mut metadata = Map::new();
    let count_type = if gguf.version() == 1 {
        "UINT32"
    } else {
        "UINT64"
    };
    let count_len = if gguf.version() == 1 { 4 } else { 8 };
    let header_fields = [
        ("GGUF.version", "UINT32", 4u64, u64::from(gguf.version())),
        (
            "GGUF.tensor_count",
            count_type,
            8,
            gguf.tensors().len() as u64,
        ),
        (
            "GGUF.kv_count",
            count_type,
            8 + count_len,
            gguf.metadata().len() as u64,
        ),
    ];
    for (index, (name, ty, offset, value)) in header_fields.into_iter().enumerate() {
        metadata.insert(
            name.into(),
            json!({"index": index, "type": ty, "offset": offset, "value": value}),
        );
    }
    for (i, entry) in gguf.metadata().iter().enumerate() {
        metadata.insert(entry.key.to_string(), metadata_json(i + 3, entry, full));
    }
    let mut tensors = Map::new();
    for (index, t) in gguf.tensors().iter().enumerate() {
        tensors.insert(
            t.name.clone(),
            json!({
                "index": index,
                "shape": t.dims,
                "type": t.ggml_type.name(),
                "offset": t.info_offset,
                "data_offset": t.data_offset,
                "n_elements": t.n_elements,
                "n_bytes": t.n_bytes,
            }),
        );
    }
    let diagnostics: Vec<String> = gguf.diagnostics().iter().map(ToString::to_string).collect();
    json!({
        "filename": filename,
        "endian": "LITTLE",
        "version": gguf.version(),
        "alignment": gguf.alignment(),
        "data_offset": gguf.data_offset(),
        "file_len": gguf.file_len(),
        "metadata": metadata,
        "tensors": tensors,
        "diagnostics": diagnostics,
    })
}

fn summarize_string(s: GgufStr<'_>, full: bool) -> String {
    let Some(text) = s.as_str() else {
        // Escaped byte by byte where it is not UTF-8, so what is shown is what is stored.
        let shown = if full {
            s.as_bytes()
        } else {
            &s.as_bytes()[..s.len().min(STRING_SUMMARY_LEN)]
        };
        let more = if shown.len() < s.len() { "..." } else { "" };
        return format!(
            "{}{more} ({} bytes, not UTF-8)",
            GgufStr::new(shown).escaped(),
            s.len()
        );
    };
    if full || text.chars().count() <= STRING_SUMMARY_LEN {
        return format!("{text:?}");
    }
    let head: String = text.chars().take(STRING_SUMMARY_LEN).collect();
    format!("{head:?}... ({} bytes)", text.len())
}

fn text_value(value: &ValueRef<'_>, full: bool) -> String {
    match value {
        ValueRef::String(s) => summarize_string(*s, full),
        ValueRef::Array(a) if !full && a.len() > ARRAY_SUMMARY_LEN => {
            let head: Vec<String> = a
                .iter()
                .take(ARRAY_HEAD_LEN)
                .map(|v| text_value(&v, false))
                .collect();
            format!(
                "[{}, ...] ({} more)",
                head.join(", "),
                a.len() - ARRAY_HEAD_LEN as u64
            )
        }
        ValueRef::Array(a) => {
            let items: Vec<String> = a.iter().map(|v| text_value(&v, full)).collect();
            format!("[{}]", items.join(", "))
        }
        other => other.to_string(),
    }
}

fn write_text(out: &mut dyn Write, filename: &str, gguf: &Gguf<'_>, full: bool) -> io::Result<()> {
    writeln!(
        out,
        "{filename}: GGUF v{}, {} metadata keys, {} tensors, {} bytes",
        gguf.version(),
        gguf.metadata().len(),
        gguf.tensors().len(),
        gguf.file_len()
    )?;
    writeln!(
        out,
        "alignment {}, tensor infos end at {}, data section at {}",
        gguf.alignment(),
        gguf.tensor_infos_end(),
        gguf.data_offset()
    )?;
    for d in gguf.diagnostics() {
        writeln!(out, "note: {d}")?;
    }
    writeln!(out, "\nMetadata")?;
    let types: Vec<String> = gguf
        .metadata()
        .iter()
        .map(|e| pretty_type(&e.value))
        .collect();
    let type_width = types.iter().map(String::len).max().unwrap_or(4).max(4);
    writeln!(out, "  {:>4}  {:type_width$}  key = value", "#", "type")?;
    for (i, (entry, ty)) in gguf.metadata().iter().zip(&types).enumerate() {
        writeln!(
            out,
            "  {:>4}  {ty:type_width$}  {} = {}",
            i + 1,
            entry.key,
            text_value(&entry.value, full)
        )?;
    }
    writeln!(out, "\nTensors")?;
    let name_width = gguf
        .tensors()
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    writeln!(
        out,
        "  {:>4}  {:name_width$}  {:7}  {:24}  {:>12}  {:>12}  {:>12}",
        "#", "name", "type", "shape", "elements", "bytes", "offset"
    )?;
    for (i, t) in gguf.tensors().iter().enumerate() {
        let shape: Vec<String> = t.dims.iter().map(u64::to_string).collect();
        writeln!(
            out,
            "  {:>4}  {:name_width$}  {:7}  {:24}  {:>12}  {:>12}  {:>12}",
            i + 1,
            t.name,
            t.ggml_type.name(),
            format!("[{}]", shape.join(", ")),
            t.n_elements,
            t.n_bytes,
            t.data_offset
        )?;
    }
    let total: u64 = gguf.tensors().iter().map(|t| t.n_bytes).sum();
    writeln!(
        out,
        "\n{} tensors, {total} bytes of tensor data",
        gguf.tensors().len()
    )?;
    Ok(())
}
