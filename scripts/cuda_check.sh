#!/usr/bin/env bash
# The GPU checks (a machine with an NVIDIA GPU).
#
# The candle backend on CUDA (always): tests/cuda_backend.rs (the GPU against the CPU backend and
# transformers' references on the tiny models, a batch of 64 against each row alone, decode
# graphs against plain launches, the paged cache under pressure) and tests/cuda_lora.rs (adapter
# rows against PEFT, base and adapter rows mixed at random against each alone, through the tiled
# kernel and through LoRA stacks). Needs cuBLAS 13 on the loader
# path (found in the local Python's nvidia-* packages) and the tiny models
# (scripts/make_tiny_model.py, or copied into tests/fixtures/generated).
#
# Then the ONNX backend on ONNX Runtime's CUDA execution provider, when ORT_DYLIB_PATH is set:
#  1. the tiny-model tests (tests/onnx_backend.rs, tests/lora_onnx.rs, tests/onnx_sampling.rs)
#     with INFERD_TEST_ONNX_DEVICE=cuda:0: logits against transformers / PEFT, batched against
#     alone, tokens sampled on the device against the host's sampler (INFERD_TEST_ONNX_MODELS
#     adds model directories to the last, e.g. an fp16 CUDA export);
#  2. `inferd serve --device cuda:0` on each model directory given (default: the tiny fp32
#     fixture): prints the provider the log names and three greedy answers, and whether they
#     equal the same server's on the CPU provider of the same library (informative only).
#
# Needs onnxruntime-gpu's libraries (ORT_DYLIB_PATH=.../libonnxruntime.so.1.31.1 with
# libonnxruntime_providers_{shared,cuda}.so beside it: the onnxruntime-gpu 1.31.1 wheel, built
# for CUDA 13), CUDA 13 + cuDNN 9 libraries on the loader path (the nvidia-* packages of a
# CUDA 13 PyTorch are found and added automatically), and a `--features cuda` build:
#   cargo build --release --features cuda
#   ORT_DYLIB_PATH=/path/to/libonnxruntime.so.1.31.1 scripts/cuda_check.sh [MODEL_DIR ...]
# INFERD_BIN and INFERD_TEST_BINS (a folder holding prebuilt onnx_backend / lora_onnx test
# executables) replace the cargo build on machines without a Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."
if libs=$(python3 - 2>/dev/null <<'EOF'
import glob, os, nvidia
dirs = {os.path.dirname(p) for base in nvidia.__path__
        for p in glob.glob(os.path.join(base, "**", "lib*.so*"), recursive=True)}
print(":".join(sorted(dirs)))
EOF
); then
    export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
BIN=${INFERD_BIN:-target/release/inferd}
MODELS=("$@")
[ ${#MODELS[@]} -gt 0 ] || MODELS=(tests/fixtures/onnx/tiny-qwen2)
status=0

for t in cuda_backend cuda_lora; do
    echo "== the candle backend on cuda:0 (tests/$t.rs)"
    if [ -n "${INFERD_TEST_BINS:-}" ]; then
        "$INFERD_TEST_BINS/$t" --test-threads 1 --nocapture > "/tmp/inferd-$t.log" 2>&1 || status=1
        grep -E "^test |max|part|identical|preempt|alone|panicked|result" "/tmp/inferd-$t.log"
    else
        cargo test --release --features cuda --test $t -- --test-threads 1 --nocapture || status=1
    fi
done
# The GPU tests on default options again with the fused one-row products (`gemv_row.cuh`), and
# the adapter tests that take the default options, again with LoRA stacks (`lora_stack.rs`; the
# tests that set the stacks themselves ran above).
echo "== tests/cuda_backend.rs with INFERD_CUDA_FUSED_ROW=1"
if [ -n "${INFERD_TEST_BINS:-}" ]; then
    INFERD_CUDA_FUSED_ROW=1 "$INFERD_TEST_BINS/cuda_backend" --test-threads 1 --nocapture > /tmp/inferd-cuda_backend-fused.log 2>&1 || status=1
    grep -E "^test |max|part|identical|preempt|alone|panicked|result" /tmp/inferd-cuda_backend-fused.log
else
    INFERD_CUDA_FUSED_ROW=1 cargo test --release --features cuda --test cuda_backend -- --test-threads 1 --nocapture || status=1
fi
echo "== tests/cuda_lora.rs with INFERD_LORA_STACK=4x8"
lora_filters=(async_scheduling more_adapters_than_device_slots)
if [ -n "${INFERD_TEST_BINS:-}" ]; then
    INFERD_LORA_STACK=4x8 "$INFERD_TEST_BINS/cuda_lora" --test-threads 1 --nocapture "${lora_filters[@]}" > /tmp/inferd-cuda_lora-stacks.log 2>&1 || status=1
    grep -E "^test |alone|panicked|result" /tmp/inferd-cuda_lora-stacks.log
else
    INFERD_LORA_STACK=4x8 cargo test --release --features cuda --test cuda_lora -- --test-threads 1 --nocapture "${lora_filters[@]}" || status=1
fi
if [ -z "${ORT_DYLIB_PATH:-}" ]; then
    echo "(ORT_DYLIB_PATH is not set: the ONNX backend's checks are skipped)"
    exit $status
fi

echo "== tiny-model tests on cuda:0"
export INFERD_TEST_ONNX_DEVICE=cuda:0
if [ -n "${INFERD_TEST_BINS:-}" ]; then
    for t in onnx_backend lora_onnx onnx_sampling; do
        "$INFERD_TEST_BINS/$t" --test-threads 1 --nocapture 2>&1 | grep -E "^test |max|diff|compared|panicked|result" || status=1
    done
else
    cargo test --release --features cuda --test onnx_backend --test lora_onnx --test onnx_sampling -- --test-threads 1 || status=1
fi
unset INFERD_TEST_ONNX_DEVICE

ask() { # port prompt -> greedy answer
    curl -sf "http://127.0.0.1:$1/v1/chat/completions" -H 'Content-Type: application/json' \
        -d "{\"model\": \"m\", \"messages\": [{\"role\": \"user\", \"content\": \"$2\"}], \"max_tokens\": 24, \"temperature\": 0}" |
        python3 -c 'import json, sys; print(json.dumps(json.load(sys.stdin)["choices"][0]["message"]["content"]))'
}
serve() { # model device port -> answers of three prompts on stdout, log in /tmp/inferd-$3.log
    "$BIN" serve --backend onnx --model "$1" --model-id m --device "$2" --port "$3" --max-batch 4 \
        > "/tmp/inferd-$3.log" 2>&1 &
    local pid=$!
    for _ in $(seq 120); do
        curl -sf "http://127.0.0.1:$3/health" > /dev/null 2>&1 && break
        kill -0 $pid 2> /dev/null || { tail -5 "/tmp/inferd-$3.log" >&2; return 1; }
        sleep 0.5
    done
    grep -o 'ONNX session ready.*provider[^ ]*' "/tmp/inferd-$3.log" | sed 's/\x1b\[[0-9;]*m//g' | grep -o 'provider=[^ ]*' >&2
    for p in "Write a haiku about rain." "What is 2+2?" "Name three colors."; do ask "$3" "$p"; done
    kill $pid
    wait $pid 2> /dev/null || true
}
for m in "${MODELS[@]}"; do
    echo "== serve $m on cuda:0 and on cpu"
    if gpu=$(serve "$m" cuda:0 18301) && cpu=$(serve "$m" cpu 18302); then
        echo "cuda:0: $gpu" | head -3
        if [ "$gpu" = "$cpu" ]; then echo "greedy answers: cuda:0 == cpu"; else echo "greedy answers differ (informative: float sums differ between providers): cpu: $cpu"; fi
    else
        echo "server failed"; status=1
    fi
done
exit $status
