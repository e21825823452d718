//! server-tier: an OpenAI-compatible proxy with hooks and a live admin API.
//!
//! This crate will hold the proxy that sits in front of llama.cpp's `llama-server` (or any
//! compatible server), its request, response and stream hooks behind the `ServerPatcher`
//! trait, the response cache and the authenticated admin API that patches the running
//! model's weights live. It is the only crate that knows HTTP. Nothing is implemented
//! yet: its issue is still open.
