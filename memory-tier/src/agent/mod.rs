//! Patches that reach every weight of an unmodified llama-server, through the agent
//! (`libhotpatch_agent.so`) loaded into it with `LD_PRELOAD`.
//!
//! The agent sees where the server places each weight tensor (a view of the file
//! mapping, a host buffer, a repacked CPU buffer, a GPU's or a remote RPC server's
//! memory) and writes bytes into those copies between forward passes. This module holds
//! the protocol it speaks ([`proto`]), a client ([`AgentClient`]), the planning of the
//! writes a change needs on each kind of buffer ([`plan`]), and [`AgentModel`], the
//! memory tier's patcher over the agent.

mod client;
mod model;
pub mod plan;
pub mod proto;

pub use client::AgentClient;
pub use model::{AgentModel, Delivery};
