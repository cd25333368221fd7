//! Candle backend: the project's own batched forward for `llama` and `qwen2` (GGUF, safetensors).
