//! `hotpatch launch`, `hotpatch agent status`, and patches and reverts through the agent
//! (`--agent SOCKET` on `patch` and `revert`).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use memory_tier::agent::proto::{Access, SOCKET_ENV};
use memory_tier::{AgentClient, AgentModel, MemoryPatch, PatchReport};
use serde_json::json;

/// The agent library's file name.
pub const AGENT_LIBRARY: &str = "libhotpatch_agent.so";

/// The environment variable that names the agent library, when it is not beside the
/// `hotpatch` binary.
pub const AGENT_LIBRARY_ENV: &str = "HOTPATCH_AGENT_LIB";

/// Arguments of `hotpatch launch`.
#[derive(Debug, clap::Args)]
pub struct LaunchArgs {
    /// The agent's control socket (default: `hotpatch-agent-PID.sock` in
    /// `$XDG_RUNTIME_DIR`, or the temporary directory).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// The agent library (default: `$HOTPATCH_AGENT_LIB`, or `libhotpatch_agent.so`
    /// beside this binary).
    #[arg(long, value_name = "FILE")]
    pub agent_library: Option<PathBuf>,
    /// The server and its arguments, after `--`.
    #[arg(last = true, required = true, value_name = "SERVER ARGS")]
    pub command: Vec<OsString>,
}

/// `hotpatch agent …`.
#[derive(Debug, clap::Subcommand)]
pub enum AgentCommand {
    /// List the tensors the agent saw placed and how each can be reached.
    Status(StatusArgs),
}

/// Arguments of `hotpatch agent status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// The agent's socket.
    pub socket: PathBuf,
    /// List every tensor, not a summary by buffer.
    #[arg(long)]
    pub tensors: bool,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// Where the agent library is.
pub fn agent_library(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    if let Some(path) = std::env::var_os(AGENT_LIBRARY_ENV) {
        return Ok(PathBuf::from(path));
    }
    let exe = std::env::current_exe().context("find this binary")?;
    let dir = exe.parent().context("this binary has no directory")?;
    // Test binaries live one level down, in `deps`.
    for candidate in [dir.join(AGENT_LIBRARY), dir.join("..").join(AGENT_LIBRARY)] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    bail!(
        "{AGENT_LIBRARY} is not beside {}; build it (cargo build -p hotpatch-agent) or set {AGENT_LIBRARY_ENV}",
        exe.display()
    )
}

/// `hotpatch launch [--socket PATH] -- llama-server ARGS…`: runs the server with the
/// agent preloaded. The server replaces this process, so signals and the exit status
/// are its own.
pub fn launch(args: &LaunchArgs) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let library = agent_library(args.agent_library.as_deref())?;
    let library = std::fs::canonicalize(&library)
        .with_context(|| format!("the agent library {}", library.display()))?;
    let socket = match &args.socket {
        Some(s) => s.clone(),
        None => std::env::var_os("XDG_RUNTIME_DIR")
            .map_or_else(std::env::temp_dir, PathBuf::from)
            .join(format!("hotpatch-agent-{}.sock", std::process::id())),
    };
    let (program, rest) = args.command.split_first().context("no server command")?;
    let mut preload = library.into_os_string();
    if let Some(existing) = std::env::var_os("LD_PRELOAD").filter(|v| !v.is_empty()) {
        preload.push(":");
        preload.push(existing);
    }
    eprintln!("hotpatch: agent socket {}", socket.display());
    let error = std::process::Command::new(program)
        .args(rest)
        .env("LD_PRELOAD", preload)
        .env(SOCKET_ENV, &socket)
        .exec();
    Err(error).with_context(|| format!("start {}", Path::new(program).display()))
}

/// `hotpatch agent status SOCKET`.
pub fn status(command: &AgentCommand) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let AgentCommand::Status(args) = command;
    let (mut client, hello) = AgentClient::connect(&args.socket)?;
    let tensors = client.tensors()?;
    if args.json {
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&json!({"hello": hello, "tensors": tensors}))?
        )?;
        return Ok(());
    }
    writeln!(
        out,
        "agent {} in pid {} (ggml {}, llama.cpp build {})",
        hello.agent,
        hello.pid,
        hello.ggml.as_deref().unwrap_or("?"),
        hello.llama_build.map_or("?".to_owned(), |b| b.to_string())
    )?;
    if let Some(why) = &hello.inert {
        writeln!(out, "INERT: {why}")?;
    }
    writeln!(
        out,
        "forward passes: {} through {}; writes: {} ({} bytes), during a pass: {}",
        hello.passes.passes,
        if hello.entry_points.is_empty() {
            "none seen yet".to_owned()
        } else {
            hello.entry_points.join(", ")
        },
        hello.passes.writes,
        hello.passes.bytes,
        hello.passes.writes_during_pass
    )?;
    if args.tensors {
        for t in &tensors {
            writeln!(
                out,
                "{:<40} {:<7} {:>12} bytes  {:<14} {}",
                t.name,
                t.type_name,
                t.nbytes,
                t.buffer,
                t.access.describe()
            )?;
        }
        return Ok(());
    }
    let mut groups: BTreeMap<(String, String), (usize, u64, Access)> = BTreeMap::new();
    for t in &tensors {
        let g = groups
            .entry((t.buffer.clone(), t.type_name.clone()))
            .or_insert((0, 0, t.access));
        g.0 += 1;
        g.1 += t.nbytes;
    }
    writeln!(out, "{} weight tensors:", tensors.len())?;
    for ((buffer, ty), (n, bytes, access)) in groups {
        writeln!(
            out,
            "  {n:>4} {ty:<7} in {buffer:<14} {:>12} bytes  {}",
            bytes,
            access.describe()
        )?;
    }
    Ok(())
}

/// Applies `patch` through the agent at `socket`, on the model `file` the server loaded.
pub fn apply(
    file: &Path,
    socket: &Path,
    persist: bool,
    patch: MemoryPatch,
) -> anyhow::Result<(PatchReport, memory_tier::agent::Delivery)> {
    let model = AgentModel::attach(file, socket, persist)
        .with_context(|| format!("attach to {} through {}", file.display(), socket.display()))?;
    let mut reports = model.apply_reported(vec![patch])?;
    let report = reports.pop().context("the model applied no patch")?;
    Ok((report, model.last_delivery()))
}

/// What `hotpatch revert --agent` reverts.
#[derive(Debug)]
pub enum Which<'a> {
    /// A journal transaction (patches made with `--persist`).
    Transaction(u64),
    /// A patch by id or name.
    Patch(&'a str),
    /// The newest applied patch.
    Last,
}

/// Reverts through the agent; answers the reverted patches' names.
pub fn revert(
    file: &Path,
    socket: &Path,
    persist: bool,
    which: Which<'_>,
) -> anyhow::Result<Vec<String>> {
    let model = AgentModel::attach(file, socket, persist)
        .with_context(|| format!("attach to {} through {}", file.display(), socket.display()))?;
    let applied = model.applied_patches();
    let targets: Vec<(uuid::Uuid, String)> = match which {
        Which::Transaction(id) => applied
            .iter()
            .filter(|a| a.journal_transaction == Some(id))
            .map(|a| (a.patch.id, a.patch.name.clone()))
            .collect(),
        Which::Patch(key) => applied
            .iter()
            .filter(|a| a.patch.id.to_string() == key || a.patch.name == key)
            .map(|a| (a.patch.id, a.patch.name.clone()))
            .collect(),
        Which::Last => applied
            .last()
            .map(|a| (a.patch.id, a.patch.name.clone()))
            .into_iter()
            .collect(),
    };
    if targets.is_empty() {
        bail!(
            "no applied patch matches {which:?} (the agent holds {} memory-only patch(es); patches made with --persist are reverted with --persist)",
            if persist { 0 } else { applied.len() }
        );
    }
    for (id, _) in targets.iter().rev() {
        model.revert(*id)?;
    }
    Ok(targets.into_iter().map(|(_, name)| name).collect())
}

/// Says which processes that map `file` a file patch of `tensor` does not reach.
pub fn report_reach(file: &Path, tensor: &byte_tier::TensorInfo) {
    use unified_manager::reach::{Holding, cpu_has_avx2, holding, mappers};
    let Ok(mappers) = mappers(file) else { return };
    let avx2 = cpu_has_avx2();
    for m in mappers {
        let verdict = match &m.agent_socket {
            Some(socket) => match AgentClient::connect(socket).and_then(|(mut c, _)| c.tensors()) {
                Ok(tensors) => match tensors.iter().find(|t| t.name == tensor.name) {
                    Some(t) if t.access == Access::FileView => Holding::Mapping,
                    Some(t) => Holding::Copy(format!("its agent reports it in {}", t.buffer)),
                    None => holding(&m.cmdline, tensor, avx2),
                },
                Err(_) => holding(&m.cmdline, tensor, avx2),
            },
            None => holding(&m.cmdline, tensor, avx2),
        };
        match verdict {
            Holding::Mapping => eprintln!(
                "reaches: pid {} ({}) maps {} and reads {} from the mapping",
                m.pid,
                m.comm,
                file.display(),
                tensor.name
            ),
            Holding::Copy(why) => {
                let how = match &m.agent_socket {
                    Some(s) => format!("patch with --agent {}", s.display()),
                    None => "run it under `hotpatch launch` and patch with --agent SOCKET".into(),
                };
                eprintln!(
                    "does NOT reach: pid {} ({}) maps {} but holds {} as a copy: {why}; {how}",
                    m.pid,
                    m.comm,
                    file.display(),
                    tensor.name
                );
            }
        }
    }
}
