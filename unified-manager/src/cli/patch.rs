//! `hotpatch patch` and `hotpatch tensor export|import`: value edits of one tensor, in
//! place through the journal.

use std::ops::Range;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use byte_tier::MappedFile;
use byte_tier::codec::{self, Transform, TransformPath, TransformReport, read_npy_file};
use byte_tier::plan::{FileStamp, NewFilesPlan, WritePlan};
use byte_tier::tensor_edit::{TensorEdit, plan_transform};
use memory_tier::{
    AttachMode, LiveModel, MemoryPatch, PatchReport, PatchTarget, Payload, ValueTransform,
};
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
    /// An importance matrix (llama-imatrix's GGUF or legacy .dat output): a transform
    /// that requantizes weighs each value with the matrix's entry for the tensor, as
    /// llama-quantize --imatrix does (block-scale transforms ignore it).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["server", "agent"])]
    pub imatrix: Option<PathBuf>,
    /// Its priority: a patch of higher priority lies over applied ones it overlaps
    /// (reverting it brings them back); one of equal or lower priority is refused.
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub priority: i32,
    /// Say what would change and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
    /// Send the patch through the admin API of the `hotpatch serve` that holds FILE
    /// (`http://127.0.0.1:8081`), so that its response cache and llama-server's prompt
    /// caches stay right.
    #[arg(long, value_name = "URL", requires = "admin_token_file")]
    pub server: Option<String>,
    /// A file holding that proxy's admin token.
    #[arg(long, value_name = "FILE", requires = "server")]
    pub admin_token_file: Option<PathBuf>,
    /// A PEM file of CA certificates to trust, besides the system's, when the proxy
    /// serves HTTPS (`hotpatch serve --tls-cert`) with a certificate a private CA signed.
    #[arg(long, value_name = "FILE", requires = "server")]
    pub admin_ca: Option<PathBuf>,
    /// Patch the weights of the llama-server running under `hotpatch launch` with the
    /// agent at SOCKET: its copies (repacked, GPU, remote) as well as the file mapping.
    #[arg(long, value_name = "SOCKET", conflicts_with = "server")]
    pub agent: Option<PathBuf>,
    /// With --agent, also journal the patch into the file, so a restarted server keeps
    /// it (and tensors the server reads from the mapping can be reached).
    #[arg(long, requires = "agent")]
    pub persist: bool,
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

/// The transform a command line asks for, validated. `expected_len` is the number of
/// elements a `--set-npy` file must hold.
fn transform(args: &PatchArgs, expected_len: u64) -> anyhow::Result<ValueTransform> {
    let transform = if let Some(f) = args.scale {
        ValueTransform::Scale(f)
    } else if let Some(f) = args.offset {
        ValueTransform::Offset(f)
    } else if let Some(bounds) = &args.clamp {
        ValueTransform::Clamp {
            min: bounds[0],
            max: bounds[1],
        }
    } else if args.zero {
        ValueTransform::Zero
    } else {
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
        ValueTransform::Set(array.values)
    };
    transform.validate().map_err(anyhow::Error::msg)?;
    Ok(transform)
}

fn describe(edit: &TensorEdit) -> String {
    describe_parts(
        &edit.tensor,
        &edit.elements,
        edit.changed_bytes,
        edit.bytes(),
        edit.writes.len(),
        Some(&edit.report),
    )
}

fn describe_parts(
    tensor: &str,
    elements: &Range<u64>,
    changed_bytes: u64,
    written: u64,
    runs: usize,
    report: Option<&TransformReport>,
) -> String {
    let Some(report) = report else {
        return format!(
            "{tensor} elements {}..{}: {changed_bytes} bytes change ({written} written in {runs} runs)",
            elements.start, elements.end
        );
    };
    let path = match report.path {
        TransformPath::Scales => "on the block scales alone",
        TransformPath::Elementwise => "element by element",
        _ => "dequantized, transformed and requantized",
    };
    format!(
        "{tensor} elements {}..{} {path}: {changed_bytes} bytes change ({written} written in {runs} runs); error against the intended values: rms {:.3e}, max {:.3e}",
        elements.start, elements.end, report.rms_error, report.max_abs_error
    )
}

/// What one applied (or planned) patch did, as the command reports it.
struct Outcome {
    tensor: String,
    elements: Range<u64>,
    changed_bytes: u64,
    written_bytes: u64,
    runs: usize,
    transform: Option<TransformReport>,
    transaction: Option<u64>,
    displaces: usize,
}

impl Outcome {
    fn from_report(report: &PatchReport, elements: Range<u64>) -> Outcome {
        Outcome {
            tensor: report.tensor.clone().unwrap_or_default(),
            elements,
            changed_bytes: report.bytes_changed,
            written_bytes: report.bytes_written,
            runs: report.runs,
            transform: report.transform.clone(),
            transaction: report.journal_transaction,
            displaces: report.displaces.len(),
        }
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
    let (elements, transform, importance) = {
        let map = MappedFile::open(&args.file)?;
        let gguf = map.parse()?;
        let tensor = gguf.require_tensor(&args.tensor)?;
        let elements = args.range.clone().unwrap_or(0..tensor.n_elements);
        let transform = transform(args, elements.end.saturating_sub(elements.start))?;
        let importance = match &args.imatrix {
            Some(path) => {
                let matrix = byte_tier::imatrix::ImportanceMatrix::read(path)?;
                let Some(weights) = matrix.weights_for(tensor)? else {
                    bail!(
                        "{} has no importance weights for {} (llama-imatrix records the \
                         matrices its text multiplies; this tensor is not one of them)",
                        path.display(),
                        args.tensor
                    );
                };
                Some(std::sync::Arc::<[f32]>::from(weights))
            }
            None => None,
        };
        (elements, transform, importance)
    };
    let name = format!("patch {} {}", args.tensor, transform.describe());
    if let Some(server) = &args.server {
        return patch_through_server(args, server, &name, &elements, transform);
    }
    let patch = MemoryPatch::new(
        name,
        PatchTarget::Tensor {
            name: args.tensor.clone(),
            elements: Some(elements.clone()),
        },
        Payload::Transform(transform),
    )
    .with_priority(args.priority);
    let patch = match importance {
        Some(weights) => patch.with_importance(weights),
        None => patch,
    };
    if let Some(socket) = args.agent.as_ref().filter(|_| !args.dry_run) {
        let (report, delivery) = super::agent::apply(&args.file, socket, args.persist, patch)?;
        let outcome = Outcome::from_report(&report, elements);
        if args.json {
            let r = outcome.transform.as_ref();
            println!(
                "{}",
                json!({"id": report.id.to_string(), "transaction": outcome.transaction,
                    "tensor": outcome.tensor, "elements": [outcome.elements.start, outcome.elements.end],
                    "changed_bytes": outcome.changed_bytes, "persist": args.persist,
                    "path": r.map(|r| format!("{:?}", r.path).to_lowercase()),
                    "rms_error": r.map(|r| r.rms_error), "max_abs_error": r.map(|r| r.max_abs_error),
                    "agent": {"writes": delivery.writes, "bytes": delivery.bytes,
                        "waited_us": delivery.waited_us, "through_file": delivery.through_file}})
            );
        } else {
            let text = describe_parts(
                &outcome.tensor,
                &outcome.elements,
                outcome.changed_bytes,
                outcome.written_bytes,
                outcome.runs,
                outcome.transform.as_ref(),
            );
            println!("live patch {}: {text}", report.id);
            println!(
                "through the agent at {}: {} write(s), {} bytes, {} us waiting for a pass boundary; {} tensor(s) reached through the file{}",
                socket.display(),
                delivery.writes,
                delivery.bytes,
                delivery.waited_us,
                delivery.through_file,
                match outcome.transaction {
                    Some(t) => format!(" (journaled as transaction {t})"),
                    None => " (memory only: revert with --agent and --last or --patch ID)".into(),
                }
            );
        }
        return Ok(());
    }
    // The write goes through a shared writable mapping of the file, under page
    // protection and through the journal: a llama-server that maps the file (on CPU,
    // with --no-repack) computes its next token with the new values. A dry run plans on
    // a private copy-on-write view instead (no journal is opened). The transform is
    // planned once, under the model's lock; that plan is what is shown, and what is
    // written, unchanged (refused if the file changed in between).
    let mode = if args.dry_run {
        AttachMode::Private
    } else {
        AttachMode::Shared
    };
    let model = LiveModel::attach(&args.file, mode)
        .with_context(|| format!("attach to {}", args.file.display()))
        .map_err(|e| with_server_hint(e, &args.file))?;
    let plan = model.plan_transaction(vec![patch])?;
    let planned = Outcome::from_report(&plan.reports()[0], elements.clone());
    let plan = super::plan::Detailed {
        details: outcome_details(&planned),
        plan: plan.on(&model),
    };
    let Some(reports) = super::plan::run(plan, args.dry_run, args.json)? else {
        return Ok(());
    };
    let outcome = Outcome::from_report(&reports[0], elements);
    print_outcome(args.json, &outcome);
    // No silent no-op: say which servers that map the file hold the tensor as a copy.
    if let Ok(tensor) = model.tensor(&args.tensor) {
        super::agent::report_reach(&args.file, tensor);
    }
    Ok(())
}

/// The fields a patch's report adds to its plan (`writes` and `bytes` are the plan's).
fn outcome_details(outcome: &Outcome) -> serde_json::Value {
    let report = outcome.transform.as_ref();
    json!({"transaction": outcome.transaction, "tensor": outcome.tensor,
        "elements": [outcome.elements.start, outcome.elements.end],
        "changed_bytes": outcome.changed_bytes, "runs": outcome.runs,
        "displaces": outcome.displaces,
        "path": report.map(|r| format!("{:?}", r.path).to_lowercase()),
        "rms_error": report.map(|r| r.rms_error),
        "max_abs_error": report.map(|r| r.max_abs_error)})
}

/// When another writer holds the file, the way through it: its admin API.
pub(crate) fn with_server_hint(error: anyhow::Error, file: &Path) -> anyhow::Error {
    let busy = error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<byte_tier::Error>(),
            Some(byte_tier::Error::JournalBusy { .. })
        ) || matches!(
            cause.downcast_ref::<memory_tier::Error>(),
            Some(memory_tier::Error::Bytes(
                byte_tier::Error::JournalBusy { .. }
            ))
        )
    });
    if busy {
        error.context(format!(
            "{} has another writer; if it is a hotpatch serve, send the change through it: --server URL --admin-token-file FILE",
            file.display()
        ))
    } else {
        error
    }
}

fn read_token(path: &Path) -> anyhow::Result<String> {
    let token = std::fs::read_to_string(path)
        .with_context(|| format!("read the admin token from {}", path.display()))?;
    if token.trim().is_empty() {
        bail!("the admin token file {} is empty", path.display());
    }
    Ok(token.trim().to_owned())
}

/// Sends the patch to a running proxy's admin API, which plans and applies it through
/// the same library call and answers with the same report.
fn patch_through_server(
    args: &PatchArgs,
    server: &str,
    name: &str,
    elements: &Range<u64>,
    transform: ValueTransform,
) -> anyhow::Result<()> {
    if args.dry_run {
        bail!("--dry-run plans on the file; without --server it writes nothing either");
    }
    let token = read_token(args.admin_token_file.as_deref().context("no token file")?)?;
    let client = super::admin_client(server, Some(token), args.admin_ca.as_deref())?;
    let reply = client.apply_patch(json!({
        "name": name,
        "tensor": args.tensor,
        "transform": transform,
        "range": [elements.start, elements.end],
        "priority": args.priority,
    }))?;
    let transform_report = reply.get("transform_report").and_then(|t| {
        Some(TransformReport {
            path: match t.get("path")?.as_str()? {
                "scales" => TransformPath::Scales,
                "elementwise" => TransformPath::Elementwise,
                _ => TransformPath::Requantized,
            },
            n_elements: t.get("n_elements")?.as_u64()?,
            rms_error: t.get("rms_error")?.as_f64()?,
            max_abs_error: t.get("max_abs_error")?.as_f64()?,
        })
    });
    let outcome = Outcome {
        tensor: args.tensor.clone(),
        elements: elements.clone(),
        changed_bytes: reply
            .get("bytes_changed")
            .and_then(|v| v.as_u64())
            .unwrap_or(0),
        written_bytes: reply
            .get("bytes_written")
            .and_then(|v| v.as_u64())
            .unwrap_or(0),
        runs: reply.get("runs").and_then(|v| v.as_u64()).unwrap_or(0) as usize,
        transform: transform_report,
        transaction: reply.get("journal_transaction").and_then(|v| v.as_u64()),
        displaces: reply
            .get("displaces")
            .and_then(|v| v.as_array())
            .map_or(0, Vec::len),
    };
    print_outcome(args.json, &outcome);
    if !args.json {
        if let Some(id) = reply.get("id").and_then(|v| v.as_str()) {
            println!("applied through {server} as live patch {id}");
        }
        if let Some(model) = reply.get("model").and_then(|v| v.as_str()) {
            println!("model: {model}");
        }
    }
    Ok(())
}

fn print_outcome(json: bool, outcome: &Outcome) {
    let report = outcome.transform.as_ref();
    if json {
        let mut value = outcome_details(outcome);
        value["dry_run"] = json!(false);
        value["bytes"] = json!(outcome.written_bytes);
        value["writes"] = json!(outcome.runs);
        println!("{value}");
        return;
    }
    let text = describe_parts(
        &outcome.tensor,
        &outcome.elements,
        outcome.changed_bytes,
        outcome.written_bytes,
        outcome.runs,
        report,
    );
    match outcome.transaction {
        Some(id) => println!("patch id {id}: {text}"),
        None => println!("nothing changed: {text}"),
    }
    if outcome.displaces > 0 {
        println!(
            "it lies over {} applied patch(es) of lower priority; reverting it brings them back",
            outcome.displaces
        );
    }
}

/// Writes a tensor's dequantized values to a float32 .npy with the GGUF shape.
pub fn export(
    file: &Path,
    name: &str,
    output: &Path,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let file = &byte_tier::split::file_holding_tensor(file, name)?;
    let map = MappedFile::open(file)?;
    let gguf = map.parse()?;
    let tensor = gguf.require_tensor(name)?.clone();
    if !codec::can_dequantize(tensor.ggml_type) {
        return Err(byte_tier::Error::UnsupportedType {
            ggml_type: tensor.ggml_type,
            operation: "export",
        }
        .in_tensor(name)
        .into());
    }
    let ggml_type = tensor.ggml_type;
    let shape = codec::npy_shape(&tensor.dims);
    let header = codec::npy_f32_header(output, &shape)?;
    let n_values = tensor.n_elements;
    let n_bytes = n_values
        .checked_mul(4)
        .and_then(|n| n.checked_add(header.len() as u64))
        .context("the tensor is too large for a .npy file")?;
    let details = json!({"tensor": name, "ggml_type": ggml_type,
        "numpy_shape": shape, "values": n_values});
    let stamp = FileStamp::take(file, map.bytes(), std::iter::once(tensor.data_range()))?;
    drop(gguf);
    // The values are decoded and written window by window when the plan is applied, so
    // memory stays flat whatever the tensor's size.
    let path = output.to_owned();
    let write: byte_tier::plan::ContentWriter = Box::new(move |out| {
        let io = |e| byte_tier::Error::io("write", &path, e);
        out.write_all(&header).map_err(io)?;
        let gguf = map.parse()?;
        let block = tensor.ggml_type.block_len();
        let window = EXPORT_WINDOW.next_multiple_of(block);
        let mut bytes = Vec::new();
        let mut at = 0;
        while at < n_values {
            let end = (at + window).min(n_values);
            let values = codec::dequantize_tensor(&gguf, &tensor, at..end)?;
            bytes.clear();
            bytes.extend(values.iter().flat_map(|v| v.to_le_bytes()));
            out.write_all(&bytes).map_err(io)?;
            at = end;
        }
        Ok(())
    });
    let plan = NewFilesPlan::streamed(Some(stamp), output.to_owned(), n_bytes, write, details)?;
    if super::plan::run(plan, dry_run, json)?.is_none() {
        return Ok(());
    }
    if json {
        println!(
            "{}",
            json!({"dry_run": false, "output": output, "tensor": name, "values": n_values})
        );
        return Ok(());
    }
    println!(
        "wrote {} ({n_values} {} values, numpy shape {shape:?})",
        output.display(),
        ggml_type,
    );
    Ok(())
}

/// Values decoded at a time by `tensor export` (rounded up to whole blocks).
const EXPORT_WINDOW: u64 = 1 << 20;

/// Replaces a tensor's values from a .npy of its shape, quantizing to its type, in place
/// through the journal.
pub fn import(
    file: &Path,
    name: &str,
    input: &Path,
    dry_run: bool,
    json: bool,
) -> anyhow::Result<()> {
    let file = &byte_tier::split::file_holding_tensor(file, name)?;
    let array = read_npy_file(input)?;
    super::meta::note_recovered(super::plan::prepare(file, dry_run)?);
    let map = MappedFile::open(file)?;
    let (edit, plan) = {
        let gguf = map.parse()?;
        let tensor = gguf.require_tensor(name)?;
        if array.gguf_dims() != tensor.dims {
            bail!(
                "{} has numpy shape {:?}; tensor {name:?} needs {:?}",
                input.display(),
                array.shape,
                codec::npy_shape(&tensor.dims)
            );
        }
        let edit = plan_transform(&gguf, name, None, &Transform::Set(&array.values))?;
        let plan = WritePlan::new(
            file,
            map.bytes(),
            format!("import {name} from {}", input.display()),
            edit.writes.clone(),
            edit_details(&edit),
        )?;
        (edit, plan)
    };
    let applied = super::plan::run(plan, dry_run, json).map_err(|e| with_server_hint(e, file))?;
    let Some(receipt) = applied else {
        return Ok(());
    };
    if json {
        let mut value = edit_details(&edit);
        value["dry_run"] = json!(false);
        value["transaction"] = json!(receipt.transaction);
        println!("{value}");
        return Ok(());
    }
    match receipt.transaction {
        Some(id) => println!("patch id {id}: {}", describe(&edit)),
        None => println!("nothing changed: {}", describe(&edit)),
    }
    Ok(())
}

/// What a planned value edit reports besides its writes: the tensor, the elements and
/// the codec's cost.
fn edit_details(edit: &TensorEdit) -> serde_json::Value {
    let r = &edit.report;
    json!({"tensor": edit.tensor, "elements": [edit.elements.start, edit.elements.end],
        "changed_bytes": edit.changed_bytes,
        "path": format!("{:?}", r.path).to_lowercase(),
        "rms_error": r.rms_error, "max_abs_error": r.max_abs_error})
}
