//! neural-alloc: a size-classed pool allocator with thread caches, leak tracking and
//! corruption checks, usable as the global allocator.
//!
//! Nothing is implemented yet: its issue is still open. It depends on no other crate of
//! the workspace.
