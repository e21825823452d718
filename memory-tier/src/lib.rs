//! memory-tier: a live model region guarded by the operating system.
//!
//! This crate will hold `LiveModel` (a shared or private mapping of a GGUF file, an owned
//! buffer, or an engine's raw region) kept read-only and opened only in page-aligned
//! writable windows, with patches, conflict checks, transactions, delta storage and
//! history behind the `MemoryPatcher` trait. It never speaks HTTP and knows nothing of
//! presets or pipelines. Nothing is implemented yet: its issue is still open.
