//! inferd: an OpenAI-compatible LLM inference server.
//!
//! Data flows one way: HTTP handler (`http`) -> checked `engine::GenRequest` -> engine queue ->
//! worker thread owning a `backend::Backend` -> events over a bounded channel per request -> SSE/JSON.
pub mod backend;
pub mod config;
pub mod engine;
pub mod http;
pub mod lora;
pub mod memory;
pub mod model;
pub mod serve;
pub mod structured;
pub mod tools;
