//! `hotpatch patch` and `hotpatch tensor export|import`: value edits of one tensor, in
//! place through the journal.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use byte_tier::codec::{self, Transform, TransformPath, read_npy_file, write_tensor_npy};
use byte_tier::tensor_edit::{TensorEdit, plan_transform};
use byte_tier::{BytePatcher, InPlaceFile, MappedFile};
use memory_tier::{AttachMode, LiveModel, MemoryPatch, PatchTarget, Payload, ValueTransform};
use serde_json::json;

/// Arguments of `hotpatch patch`.
#[derive(Clone, Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("transform").required(true).args(["scale", "offset", "clamp", "zero", "set_npy"])))]
pub struct PatchArgs {
    /// The file to patch in place (a running llama-server that maps it sees the change).
    pub file: PathBuf,
    /// The tensor.
    #[arg(long, value_name = "NAME")]
    pub tensor: String,
    /// Multiply the values by F (on block scales alone where the type allows).
    #[arg(long, value_name = "F", allow_hyphen_values = true)]
    pub scale: Option<f32>,
    /// Add F to the values.
    #[arg(long, value_name = "F", allow_hyphen_values = true)]
    pub offset: Option<f32>,
    /// Clamp the values into MIN..=MAX.
    #[arg(long, num_args = 2, value_names = ["MIN", "MAX"], allow_hyphen_values = true)]
    pub clamp: Option<Vec<f32>>,
    /// Set the values to zero.
    #[arg(long)]
    pub zero: bool,
    /// Set the values from a .npy file (float16/32/64) of the range's shape.
    #[arg(long, value_name = "IN.npy")]
    pub set_npy: Option<PathBuf>,
    /// Element range START..END (whole blocks of the tensor's type); the whole tensor
    /// by default.
    #[arg(long, value_parser = parse_range)]
    pub range: Option<Range<u64>>,
    /// Say what would change and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

fn parse_range(text: &str) -> Result<Range<u64>, String> {
    let (start, end) = text
        .split_once("..")
        .ok_or_else(|| format!("{text:?}: expected START..END"))?;
    let number = |s: &str| super::args::parse_number(s);
    let range = number(start)?..number(end)?;
    if range.start > range.end {
        return Err(format!("{text:?}: the range is reversed"));
    }
    Ok(range)
}

/// The transform a command line asks for; `values` keeps .npy data alive.
fn transform<'a>(
    args: &PatchArgs,
    values: &'a mut Vec<f32>,
    expected_len: u64,
) -> anyhow::Result<Transform<'a>> {
    if let Some(f) = args.scale {
        return Ok(Transform::Scale(f));
    }
    if let Some(f) = args.offset {
        return Ok(Transform::Offset(f));
    }
    if let Some(bounds) = &args.clamp {
        return Ok(Transform::Clamp {
            min: bounds[0],
            max: bounds[1],
        });
    }
    if args.zero {
        return Ok(Transform::Zero);
    }
    let path = args.set_npy.as_ref().context("no transform given")?;
    let array = read_npy_file(path)?;
    if array.values.len() as u64 != expected_len {
        bail!(
            "{} holds {} values (shape {:?}); the range has {expected_len}",
            path.display(),
            array.values.len(),
            array.shape
        );
    }
    *values = array.values;
    Ok(Transform::Set(values))
}

fn describe(edit: &TensorEdit) -> String {
    let path = match edit.report.path {
        TransformPath::Scales => "on the block scales alone",
        TransformPath::Elementwise => "element by element",
        _ => "dequantized, transformed and requantized",
    };
    format!(
        "{} elements {}..{} {path}: {} bytes change ({} written in {} runs); error against the intended values: rms {:.3e}, max {:.3e}",
        edit.tensor,
        edit.elements.start,
        edit.elements.end,
        edit.changed_bytes,
        edit.bytes(),
        edit.writes.len(),
        edit.report.rms_error,
        edit.report.max_abs_error
    )
}

/// The memory-tier form of the transform a command line asks for.
fn value_transform(t: &Transform<'_>) -> ValueTransform {
    match *t {
        Transform::Scale(f) => ValueTransform::Scale(f),
        Transform::Offset(f) => ValueTransform::Offset(f),
        Transform::Clamp { min, max } => ValueTransform::Clamp { min, max },
        Transform::Set(values) => ValueTransform::Set(values.to_vec()),
        _ => ValueTransform::Zero,
    }
}

pub fn patch(args: &PatchArgs) -> anyhow::Result<()> {
    // In a shard set, the patch goes to the shard that holds the tensor, through that
    // file's own journal.
    let file = byte_tier::split::file_holding_tensor(&args.file, &args.tensor)?;
    let args = &PatchArgs {
        file,
        ..args.clone()
    };
    let mut values = Vec::new();
    // Plan on a read-only map first: it checks everything and gives the report.
    let (edit, value_transform) = {
        let map = MappedFile::open(&args.file)?;
        let gguf = map.parse()?;
        let tensor = gguf.require_tensor(&args.tensor)?;
        let range = args.range.clone().unwrap_or(0..tensor.n_elements);
        let t = transform(args, &mut values, range.end.saturating_sub(range.start))?;
        let edit = plan_transform(&gguf, &args.tensor, Some(range), &t)?;
        (edit, value_transform(&t))
    };
    if args.dry_run {
        report(args.json, &edit, None, true);
        return Ok(());
    }
    if edit.writes.is_empty() {
        report(args.json, &edit, None, false);
        return Ok(());
    }
    // The write goes through a shared writable mapping of the file, under page
    // protection and through the journal: a llama-server that maps the file (on CPU,
    // with --no-repack) computes its next token with the new values.
    let model = LiveModel::attach(&args.file, AttachMode::Shared)
        .with_context(|| format!("attach to {}", args.file.display()))?;
    let patch = MemoryPatch::new(
        format!("patch {} {}", args.tensor, what(args)),
        PatchTarget::Tensor {
            name: args.tensor.clone(),
            elements: Some(edit.elements.clone()),
        },
        Payload::Transform(value_transform),
    );
    let id = model.apply(patch)?;
    report(args.json, &edit, model.journal_transaction(id), false);
    Ok(())
}

fn what(args: &PatchArgs) -> String {
    match (
        &args.scale,
        &args.offset,
        &args.clamp,
        args.zero,
        &args.set_npy,
    ) {
        (Some(f), ..) => format!("scale {f}"),
        (_, Some(f), ..) => format!("offset {f}"),
        (_, _, Some(b), ..) => format!("clamp {} {}", b[0], b[1]),
        (_, _, _, true, _) => "zero".to_owned(),
        (.., Some(p)) => format!("set from {}", p.display()),
        _ => String::new(),
    }
}

fn report(json: bool, edit: &TensorEdit, transaction: Option<u64>, dry_run: bool) {
    if json {
        println!(
            "{}",
            json!({"dry_run": dry_run, "transaction": transaction, "tensor": edit.tensor,
                "elements": [edit.elements.start, edit.elements.end], "bytes": edit.bytes(), "changed_bytes": edit.changed_bytes,
                "writes": edit.writes.len(), "path": format!("{:?}", edit.report.path).to_lowercase(),
                "rms_error": edit.report.rms_error, "max_abs_error": edit.report.max_abs_error})
        );
        return;
    }
    match (dry_run, transaction) {
        (true, _) => println!("dry run: {}", describe(edit)),
        (false, Some(id)) => println!("patch id {id}: {}", describe(edit)),
        (false, None) => println!("nothing changed: {}", describe(edit)),
    }
}

/// Writes a tensor's dequantized values to a float32 .npy with the GGUF shape.
pub fn export(file: &Path, name: &str, output: &Path, dry_run: bool) -> anyhow::Result<()> {
    let file = &byte_tier::split::file_holding_tensor(file, name)?;
    let map = MappedFile::open(file)?;
    let gguf = map.parse()?;
    let tensor = gguf.require_tensor(name)?;
    if dry_run {
        if !codec::can_dequantize(tensor.ggml_type) {
            bail!(
                "tensor {name:?} is {}, which has no decoder",
                tensor.ggml_type
            );
        }
        println!(
            "dry run: would write {} ({} {} values as float32, numpy shape {:?}, {} bytes of data)",
            output.display(),
            tensor.n_elements,
            tensor.ggml_type,
            codec::npy_shape(&tensor.dims),
            tensor.n_elements * 4
        );
        return Ok(());
    }
    let values = codec::dequantize_tensor(&gguf, tensor, 0..tensor.n_elements)?;
    write_tensor_npy(output, &tensor.dims, &values)?;
    println!(
        "wrote {} ({} {} values, numpy shape {:?})",
        output.display(),
        values.len(),
        tensor.ggml_type,
        codec::npy_shape(&tensor.dims)
    );
    Ok(())
}

/// Replaces a tensor's values from a .npy of its shape, quantizing to its type, in place
/// through the journal.
pub fn import(file: &Path, name: &str, input: &Path, dry_run: bool) -> anyhow::Result<()> {
    let file = &byte_tier::split::file_holding_tensor(file, name)?;
    let array = read_npy_file(input)?;
    let mut in_place = InPlaceFile::open(file)
        .with_context(|| format!("open {} for in-place editing", file.display()))?;
    let edit = {
        let gguf = in_place.gguf()?;
        let tensor = gguf.require_tensor(name)?;
        if array.gguf_dims() != tensor.dims {
            bail!(
                "{} has numpy shape {:?}; tensor {name:?} needs {:?}",
                input.display(),
                array.shape,
                codec::npy_shape(&tensor.dims)
            );
        }
        plan_transform(&gguf, name, None, &Transform::Set(&array.values))?
    };
    if dry_run {
        println!("dry run: {}", describe(&edit));
        return Ok(());
    }
    let receipt = in_place.commit(
        &format!("import {name} from {}", input.display()),
        edit.writes.clone(),
    )?;
    match receipt.transaction {
        Some(id) => println!("patch id {id}: {}", describe(&edit)),
        None => println!("nothing changed: {}", describe(&edit)),
    }
    Ok(())
}
