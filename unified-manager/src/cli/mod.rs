//! One module per subcommand.

pub mod args;
pub mod bytes;
pub mod check;
pub mod demo;
pub mod inspect;
pub mod journal;
pub mod meta;
pub mod patch;
pub mod pipeline;
pub mod preset;
pub mod progress;
pub mod serve;
pub mod split;
pub mod structure;
pub mod surgery;
pub mod view;

/// Whether the error is a write to a closed pipe (`hotpatch inspect | head`), which is
/// not a failure of the command.
pub fn is_broken_pipe(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        cause
            .downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}
