//! The `hotpatch` command line: parses arguments, builds library objects, prints.
//! No logic of its own lives here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use neural_alloc::{Config, NeuralAlloc};

mod cli;

/// The binary's allocator. Tracking stays off, even in debug builds, unless
/// `HOTPATCH_ALLOC=track` (or `track-backtrace`) asks for it; guard bytes are always
/// checked.
#[global_allocator]
static ALLOCATOR: NeuralAlloc = NeuralAlloc::with_config(Config {
    tracking: false,
    ..Config::DEFAULT
});

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the command failed (the message says why; nothing was written, or a pipeline
     undid what it had done), or a check found a problem (verify, safety)
  2  the command line is invalid

Every query command takes --json; every command that writes takes --dry-run.

Environment:
  HOTPATCH_ALLOC=track  track every allocation and print a leak report at exit";

/// Surgical, checked and revertible edits of GGUF models.
#[derive(Debug, Parser)]
#[command(name = "hotpatch", version, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a GGUF file's metadata and tensor table.
    Inspect(cli::inspect::InspectArgs),
    /// Walk through the main job on a generated llama-shaped model: live patch,
    /// conflict, rollback, quantized-domain scale, safety pipeline, diff, revert.
    Demo(cli::demo::DemoArgs),
    /// Byte operations on a file, in place through the journal.
    Bytes(cli::bytes::BytesArgs),
    /// List the in-place transactions recorded in a file's journal.
    History(cli::journal::HistoryArgs),
    /// Restore the bytes a transaction replaced (itself journaled).
    Revert(cli::journal::RevertArgs),
    /// Roll back an unfinished transaction left by a crash.
    Recover(cli::journal::RecoverArgs),
    /// Hex dump of a byte range or a tensor.
    Hexdump(cli::view::HexdumpArgs),
    /// Find every occurrence of a byte pattern.
    Search(cli::view::SearchArgs),
    /// Read and change metadata.
    Meta(cli::meta::MetaArgs),
    /// Remove transformer blocks: drop blk.N.*, renumber, trim per-layer arrays.
    Prune(cli::structure::PruneArgs),
    /// Change a tensor's values in place (scale, offset, clamp, zero, set from .npy).
    Patch(cli::patch::PatchArgs),
    /// Convert tensors selected by a regular expression to another type (a rewrite).
    Requantize(cli::structure::RequantizeArgs),
    /// Check structure, scan every tensor for NaN and infinity, write or check a manifest.
    Verify(cli::check::VerifyArgs),
    /// Compare two files: keys and tensors added, removed and changed.
    Diff(cli::check::DiffArgs),
    /// Split a file into a shard set, byte for byte as llama-gguf-split does.
    Split(cli::split::SplitArgs),
    /// Merge a shard set into one file, byte for byte as llama-gguf-split --merge does.
    Merge(cli::split::MergeArgs),
    /// Tensor-level commands.
    #[command(subcommand)]
    Tensor(cli::structure::StructureCommand),
    /// Remove a direction from every matrix that writes into the residual stream (and
    /// the embeddings), in place, each tensor requantized to its own type.
    Ablate(cli::surgery::AblateArgs),
    /// Merge a LoRA adapter keeping every tensor's type, or revert that merge.
    #[command(subcommand)]
    Lora(cli::surgery::LoraCommand),
    /// Block-level commands (duplicate a run of blocks: the passthrough self-merge).
    #[command(subcommand)]
    Layers(cli::surgery::LayersCommand),
    /// Run the OpenAI-compatible proxy (rules, cache, live-patch admin API).
    Serve(cli::serve::ServeArgs),
    /// Start llama-server (or another program) with the agent preloaded, so that live
    /// patches reach every weight it holds: `hotpatch launch -- llama-server -m M.gguf`.
    Launch(cli::agent::LaunchArgs),
    /// The agent inside a server started with `hotpatch launch`.
    #[command(subcommand)]
    Agent(cli::agent::AgentCommand),
    /// Integrity check, NaN/infinity scan and repair, outlier clamp, server safety rules.
    Safety(cli::pipeline::SafetyArgs),
    /// Requantize and prune in one rewrite into a new file; sizes before and after.
    Optimize(cli::pipeline::OptimizeArgs),
    /// Warm the page cache (and optionally lock pages); cold and warm read times.
    Boost(cli::pipeline::BoostArgs),
    /// Named, versioned sets of memory patches, byte patches and server rules.
    #[command(subcommand)]
    Preset(cli::preset::PresetCommand),
    /// Export or import every preset and setting.
    #[command(subcommand)]
    Config(cli::preset::ConfigCommand),
    /// A fleet of `hotpatch serve --fleet` replicas on etcd: members, status, history,
    /// and two-phase apply / revert of a patch set on every replica.
    #[command(subcommand)]
    Fleet(cli::fleet::FleetCommand),
}

fn main() -> ExitCode {
    // Before tracking starts: the handler's registration is kept for the life of the
    // process and is no leak.
    if let Err(error) = cli::report_file_size_limit_as_error() {
        eprintln!("hotpatch: {error:#}");
        return ExitCode::FAILURE;
    }
    let tracking = std::env::var_os(neural_alloc::HOTPATCH_ALLOC_VARIABLE).is_some()
        && neural_alloc::enable_tracking_from_env(&ALLOCATOR);
    let code = run();
    if tracking {
        neural_alloc::print_leak_report(&ALLOCATOR);
    }
    code
}

fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => cli::inspect::run(&args),
        Command::Demo(args) => cli::demo::run(&args),
        Command::Bytes(args) => cli::bytes::run(&args),
        Command::History(args) => cli::journal::history(&args),
        Command::Revert(args) => cli::journal::revert(&args),
        Command::Recover(args) => cli::journal::recover(&args),
        Command::Hexdump(args) => cli::view::hexdump(&args),
        Command::Search(args) => cli::view::search(&args),
        Command::Meta(args) => cli::meta::run(&args),
        Command::Prune(args) => cli::structure::prune(&args),
        Command::Tensor(command) => cli::structure::run(&command),
        Command::Patch(args) => cli::patch::patch(&args),
        Command::Requantize(args) => cli::structure::requantize(&args),
        Command::Verify(args) => cli::check::verify(&args),
        Command::Diff(args) => cli::check::run_diff(&args),
        Command::Ablate(args) => cli::surgery::ablate(&args),
        Command::Lora(command) => cli::surgery::lora(&command),
        Command::Layers(command) => cli::surgery::layers(&command),
        Command::Split(args) => cli::split::split(&args),
        Command::Merge(args) => cli::split::merge(&args),
        Command::Serve(args) => cli::serve::run(&args),
        Command::Launch(args) => cli::agent::launch(&args),
        Command::Agent(command) => cli::agent::status(&command),
        Command::Safety(args) => cli::pipeline::safety(&args),
        Command::Optimize(args) => cli::pipeline::optimize(&args),
        Command::Boost(args) => cli::pipeline::boost(&args),
        Command::Preset(command) => cli::preset::preset(&command),
        Command::Config(command) => cli::preset::config(&command),
        Command::Fleet(command) => cli::fleet::run(&command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) if cli::is_broken_pipe(&error) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("hotpatch: {error:#}");
            ExitCode::FAILURE
        }
    }
}
