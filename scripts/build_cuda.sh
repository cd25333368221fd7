#!/usr/bin/env bash
# Builds inferd with `--features cuda` on a machine without CUDA: NVIDIA's compiler comes from the
# package registry (PyPI wheels, pinned to CUDA 13.0 so that the kernels load on a 13.0 driver,
# 580.x; newer PTX does not) into .cuda/ (gitignored), and the build targets any x86-64 CPU with
# AVX2 (x86-64-v3) rather than this machine's own, since the binary runs on the GPU machine.
#
#   scripts/build_cuda.sh              # toolchain + release binary and test executables
#   scripts/build_cuda.sh --toolchain  # only install the toolchain (what `cargo check --features cuda` needs)
#   scripts/build_cuda.sh --check      # toolchain + `cargo check --features cuda --all-targets` (CI)
#
# Outputs: target/cuda/release/inferd, and the GPU test executables under target/cuda/release/deps
# (`--out DIR` copies the binary and those test executables there). INFERD_CUDA_ARCHS picks
# the GPU architectures (default 80,86,89,90; build.rs). At run time the binary loads libcuda
# (the driver) and cuBLAS 13 (libcublas.so.13, libcublasLt.so.13: `pip install nvidia-cublas==13.0.*`).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

mode=build
out=""
while [ $# -gt 0 ]; do
    case "$1" in
        --toolchain) mode=toolchain ;;
        --check) mode=check ;;
        --out) out="$2"; shift ;;
        *) echo "unknown argument $1" >&2; exit 2 ;;
    esac
    shift
done

# nvcc 13.0.88 with the pieces it needs to compile device code (crt headers, cicc in nvvm, the
# runtime headers, CCCL), as `facts.md` records.
WHEELS="nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85"
prefix="$root/.cuda"
nvcc="$prefix/nvidia/cu13/bin/nvcc"
if [ ! -x "$nvcc" ] || ! "$nvcc" --version | grep -q "release 13.0"; then
    echo "==> CUDA 13.0 toolchain (PyPI wheels) -> .cuda/"
    tmp="$(mktemp -d)"
    trap 'rm -rf "$tmp"' EXIT
    "${PYTHON:-python3}" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
        --platform manylinux_2_27_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
        --python-version 3.11 -d "$tmp" $WHEELS
    rm -rf "$prefix" && mkdir -p "$prefix"
    for w in "$tmp"/*.whl; do "${PYTHON:-python3}" -m zipfile -e "$w" "$prefix"; done
    chmod +x "$prefix"/nvidia/cu13/bin/* "$prefix"/nvidia/cu13/nvvm/bin/* 2>/dev/null || true
fi
"$nvcc" --version | tail -2
export CUDA_HOME="$prefix/nvidia/cu13"
[ "$mode" = toolchain ] && exit 0

if [ "$mode" = check ]; then
    # The repository's own target directory and flags: only type-checks (and compiles the
    # kernels, in build.rs), so CI shares its dependencies' metadata with the CPU build.
    cargo check --locked --features cuda --all-targets
    # The cuda code's host-side unit tests (the LoRA tiles' layout, the ONNX slots' sizing): no
    # GPU needed; the checked profile shares the CPU build's dependencies.
    cargo test --profile checked --locked --features cuda --lib -- backend::cuda backend::onnx::device
    exit 0
fi
export CARGO_TARGET_DIR="$root/target/cuda"
export RUSTFLAGS="-C target-cpu=x86-64-v3"
echo "==> cargo build --release --features cuda (target/cuda)"
# The test executables scripts/cuda_check.sh runs on the GPU machine.
gpu_tests="cuda_backend cuda_lora onnx_backend lora_onnx onnx_sampling"
cargo build --release --locked --features cuda --bin inferd
cargo build --release --locked --features cuda $(printf -- '--test %s ' $gpu_tests)
if [ -n "$out" ]; then
    mkdir -p "$out"
    cp target/cuda/release/inferd "$out/"
    for t in $gpu_tests; do
        exe=$(ls -t target/cuda/release/deps/$t-* 2>/dev/null | grep -v '\.d$' | head -1)
        [ -n "$exe" ] && cp "$exe" "$out/$t"
    done
    strip "$out"/* 2>/dev/null || true
    ls -la "$out"
fi
