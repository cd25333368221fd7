//! Tests of the HTTP layer with scripted fake generators and the real Qwen2 tokenizer.
mod errors;
mod routes;
mod sse_machine;
mod streaming;
mod tokenize;
mod tools;
pub(crate) mod support;
mod validation;
