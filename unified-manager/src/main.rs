//! The `hotpatch` command line: parses arguments, builds library objects, prints.
//! No logic of its own lives here.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod cli;

const EXIT_CODES: &str = "\
Exit codes:
  0  success
  1  the command failed (the message says why; nothing was written)
  2  the command line is invalid";

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
    /// Generate a small llama-shaped model in a temporary directory and inspect it.
    Demo(cli::demo::DemoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Inspect(args) => cli::inspect::run(&args),
        Command::Demo(args) => cli::demo::run(&args),
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
