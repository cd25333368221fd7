//! Server configuration: config.toml, then environment, then flags.
