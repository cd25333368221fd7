//! The OpenAI-compatible HTTP surface (axum).
