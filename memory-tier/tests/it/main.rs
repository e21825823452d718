//! memory-tier against real mappings, real page protection and a real llama-server.

mod live;
mod llama;
mod ops;
