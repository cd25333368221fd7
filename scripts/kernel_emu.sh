#!/usr/bin/env bash
# Runs CUDA kernels of src/backend/cuda on the CPU through a small emulator (tests/kernel_emu):
# no GPU, no CUDA toolkit, only a C++20 compiler and an x86-64 CPU with F16C. About a minute on 2
# cores. The GPU tests proper run on a GPU machine (scripts/cuda_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p target
"${CXX:-c++}" -std=c++20 -O1 -mf16c -pthread -I tests/kernel_emu tests/kernel_emu/kernels_test.cpp -o target/kernel_emu
target/kernel_emu
