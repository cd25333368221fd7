//! Chat templates (Jinja, as shipped in tokenizer_config.json or GGUF metadata) rendered with
//! minijinja in Python-compatible mode.
