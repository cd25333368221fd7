#!/usr/bin/env bash
# Checks the images that scripts/docker_build.sh builds, on this machine (no GPU needed):
#
#   scripts/docker_check.sh          # both: inferd:cpu, then inferd:cuda
#   scripts/docker_check.sh cpu      # or only one of them
#   scripts/docker_check.sh cuda
#
# inferd:cpu: starts it with SmolLM2 mounted (scripts/fetch_models.sh smollm2, sha256-checked) as
#   the Kubernetes manifests run it (read-only root file system, /tmp a tmpfs, no capabilities, its
#   config.toml mounted, the admin key from the environment), waits for /health, checks /ready,
#   streams a chat completion, reads /metrics, expects 4xx for bad requests, loads a LoRA adapter
#   from a read-only /adapters at run time with the admin key (the command docs/deploy.md runs in
#   each pod), sees Docker's HEALTHCHECK report healthy, checks the non-root user and tini as PID 1;
#   then stops it with `docker stop` while a stream is running and checks that the stream finished
#   (drained, not cut), the exit status is 0 and how long the stop took; then serves the tiny ONNX
#   test model on the onnx backend (the image's ONNX Runtime) and times a stop while idle.
# inferd:cuda: the binary starts; the loader finds every library of the binary, of ONNX Runtime's
#   CUDA provider and of the NVIDIA libraries, missing only the driver's libcuda.so.1 (which the
#   NVIDIA container toolkit brings); `serve --device cuda:0` on a machine without a GPU stops with
#   a clear message, on both backends; the same image serves on the CPU (both backends).
# Images missing are built first (scripts/docker_build.sh). INFERD_CHECK_KEEP=1 keeps containers.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

which="${1:-all}"
case "$which" in cpu|cuda|all) ;; *) echo "usage: scripts/docker_check.sh [cpu|cuda|all]" >&2; exit 2 ;; esac

pass=0
fail=0
ok() { printf 'ok    %s\n' "$*"; pass=$((pass + 1)); }
bad() { printf 'FAIL  %s\n' "$*"; fail=$((fail + 1)); }
check() { local what="$1"; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
log() { printf '\n==> %s\n' "$*"; }
die() { echo "docker_check: $*" >&2; exit 1; }
now() { date +%s.%N; }
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# The containers this script starts (by name: start() runs inside $(...), a subshell).
containers=(inferd-check-cpu inferd-check-cpu-onnx inferd-check-cuda-cpu inferd-check-cuda-onnx)
tmp="$(mktemp -d)"
cleanup() {
  if [ "${INFERD_CHECK_KEEP:-0}" != 1 ]; then
    docker rm -f "${containers[@]}" >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

scripts/docker_build.sh engine
model="$(scripts/fetch_models.sh smollm2)"
models_dir="$(dirname "$model")"
model_file="/models/$(basename "$model")"
onnx_dir="$root/tests/fixtures/onnx/tiny-qwen2"
# SmolLM2 LoRA adapters (scripts/make_test_adapters.py, as scripts/test.sh makes them).
adapters_dir="$root/tests/fixtures/generated/smollm2-lora"
if [ ! -f "$adapters_dir/qv/adapter_config.json" ] && [ -x .venv/bin/python ]; then
  .venv/bin/python scripts/make_test_adapters.py >/dev/null 2>&1 || true
fi
admin_key="sk-admin-docker-check"
smol=smollm2-135m-instruct   # the model id in deploy/kubernetes/smollm2-cpu.yaml's config

ensure_image() {
  docker image inspect "inferd:$1" >/dev/null 2>&1 && return 0
  log "inferd:$1 is not built: scripts/docker_build.sh $1"
  scripts/docker_build.sh "$1"
}

# start NAME IMAGE [docker run args] -- [inferd serve args]: runs detached with port 8080 published
# on a free loopback port; prints the container id.
start() {
  local name="$1" image="$2"; shift 2
  case " ${containers[*]} " in *" $name "*) ;; *) echo "docker_check: add $name to containers" >&2; exit 1 ;; esac
  local dargs=()
  while [ $# -gt 0 ] && [ "$1" != -- ]; do dargs+=("$1"); shift; done
  [ "${1:-}" = -- ] && shift
  docker rm -f "$name" >/dev/null 2>&1 || true
  local id
  id="$(docker run -d --name "$name" -p 127.0.0.1::8080 "${dargs[@]}" "$image" serve "$@")"
  echo "$id"
}

base_url() { echo "http://$(docker port "$1" 8080/tcp | head -1)"; }

# wait_health ID SECONDS: until /health answers 200 (fails early when the container exits).
wait_health() {
  local id="$1" limit="$2" url t0
  t0=$(now)
  for _ in $(seq $((limit * 4))); do
    [ "$(docker inspect -f '{{.State.Running}}' "$id")" = true ] || { docker logs "$id" 2>&1 | tail -20; return 1; }
    url="$(base_url "$id")"
    if curl -fsS -o /dev/null --max-time 2 "$url/health" 2>/dev/null; then
      echo "    up after $(secs "$t0" "$(now)") s"
      return 0
    fi
    sleep 0.25
  done
  docker logs "$id" 2>&1 | tail -20
  return 1
}

status_of() { curl -s -o "$tmp/body" -w '%{http_code}' --max-time 30 "$@"; }

chat() { # chat URL MODEL MAX_TOKENS STREAM(true|false) [extra json]
  printf '{"model": "%s", "messages": [{"role": "user", "content": "Write a haiku about containers."}], "max_tokens": %s, "stream": %s%s}' \
    "$2" "$3" "$4" "${5:-}" > "$tmp/req.json"
  curl -sS -N --max-time 300 "$1/v1/chat/completions" -H 'Content-Type: application/json' --data-binary @"$tmp/req.json"
}

check_cpu() {
  ensure_image cpu
  local image=inferd:cpu size
  log "inferd:cpu: image"
  size=$(docker image inspect -f '{{.Size}}' $image)
  echo "    size $((size / 1000000)) MB"
  check "size under 200 MB ($((size / 1000000)) MB)" test "$size" -lt 200000000
  check "runs as user 10001:10001" test "$(docker image inspect -f '{{.Config.User}}' $image)" = 10001:10001
  check "entrypoint is tini -> inferd" test "$(docker image inspect -f '{{json .Config.Entrypoint}}' $image)" = '["/usr/bin/tini","--","/usr/local/bin/inferd"]'
  check "HEALTHCHECK on /health" bash -c "docker image inspect -f '{{json .Config.Healthcheck.Test}}' $image | grep -q /health"
  check "inferd --version" docker run --rm --entrypoint /usr/local/bin/inferd $image --version
  check "the loader finds every library of inferd and ONNX Runtime" bash -c \
    "! docker run --rm --entrypoint ldd $image /usr/local/bin/inferd /usr/local/lib/inferd/libonnxruntime.so | grep 'not found'"

  log "inferd:cpu: serving SmolLM2 ($model_file, mounted read-only) with deploy/kubernetes/smollm2-cpu.yaml's config.toml"
  local c url
  # The image's config with run-time adapter loading below /adapters, mounted over the image's own.
  # The config.toml of the Kubernetes ConfigMap (deploy/kubernetes/smollm2-cpu.yaml): SmolLM2 from
  # /models, run-time adapter loading below /adapters, bounded KV and prefix caches.
  awk '/^  config.toml: \|/ { on = 1; next } on && /^    / { print substr($0, 5); next } on && /^$/ { print; next } on { exit }' \
    deploy/kubernetes/smollm2-cpu.yaml > "$tmp/config.toml"
  chmod a+r "$tmp/config.toml"
  grep -q '^lora_root = "/adapters"' "$tmp/config.toml" || die "no config.toml with lora_root in deploy/kubernetes/smollm2-cpu.yaml"
  local adapter_mount=()
  if [ -f "$adapters_dir/qv/adapter_config.json" ]; then
    # A copy readable by the image's user (uid 10001), as files on a shared volume must be.
    cp -r "$adapters_dir" "$tmp/adapters" && chmod -R a+rX "$tmp/adapters"
    adapter_mount=(-v "$tmp/adapters:/adapters:ro")
  fi
  # The image's own HEALTHCHECK command, run every 2 s instead of 30 so that the check sees it.
  # --read-only, a /tmp tmpfs, no capabilities, no privilege gain: the manifests' securityContext.
  c=$(start inferd-check-cpu $image -v "$models_dir:/models:ro" -v "$tmp/config.toml:/etc/inferd/config.toml:ro" \
    ${adapter_mount[@]+"${adapter_mount[@]}"} -e INFERD_ADMIN_API_KEY="$admin_key" \
    --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
    --health-interval 2s --health-start-period 60s --)
  check "starts and answers /health" wait_health "$c" 120
  url="$(base_url "$c")"
  check "/ready is 200" test "$(status_of "$url/ready")" = 200
  check "GET /v1/models lists the model" bash -c "curl -fsS '$url/v1/models' | grep -q '\"$smol\"'"

  chat "$url" $smol 48 true ', "stream_options": {"include_usage": true}' > "$tmp/stream.txt" || true
  local chunks
  chunks=$(grep -c '"delta"' "$tmp/stream.txt" || true)
  check "streamed chat completion: $chunks chunks, ends with [DONE]" bash -c "[ $chunks -gt 3 ] && tail -3 '$tmp/stream.txt' | grep -q '^data: \[DONE\]'"
  echo "    text: $(grep -o '"content":"[^"]*"' "$tmp/stream.txt" | sed 's/"content":"//; s/"$//' | tr -d '\n' | head -c 160)"

  curl -fsS "$url/metrics" > "$tmp/metrics.txt" || true
  check "/metrics has inferd_requests_waiting, vllm:num_requests_waiting and the generated tokens" bash -c \
    "grep -q '^inferd_requests_waiting{' '$tmp/metrics.txt' && grep -q '^vllm:num_requests_waiting{' '$tmp/metrics.txt' && grep -Eq '^inferd_generation_tokens_total\{.*\} [1-9]' '$tmp/metrics.txt'"

  echo "    memory in use after the stream: $(docker stats --no-stream --format '{{.MemUsage}}' "$c")"

  local s
  s=$(status_of "$url/v1/chat/completions" -H 'Content-Type: application/json' --data-binary '{"model": ')
  check "malformed JSON is a 400 ($s)" test "$s" = 400
  s=$(status_of "$url/v1/chat/completions" -H 'Content-Type: application/json' --data-binary '{"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}')
  check "unknown model is a 404 ($s)" test "$s" = 404
  s=$(status_of "$url/v1/chat/completions" -H 'Content-Type: application/json' --data-binary '{"model": "'"$smol"'", "messages": [{"role": "user", "content": "hi"}], "temperature": 7}')
  check "temperature out of range is a 400 ($s)" test "$s" = 400

  if [ ${#adapter_mount[@]} -gt 0 ]; then
    log "inferd:cpu: a LoRA adapter loaded at run time (the admin key, from inside the container)"
    s=$(status_of "$url/v1/load_lora_adapter" -H 'Content-Type: application/json' --data-binary '{"lora_name": "qv", "lora_path": "qv"}')
    check "load_lora_adapter without the admin key is refused ($s)" bash -c "[ '$s' = 401 ] || [ '$s' = 403 ]"
    # What docs/deploy.md runs in every pod (kubectl exec POD -- sh -c '...'): busybox's wget, the
    # admin key from the pod's environment.
    docker exec "$c" sh -c 'busybox wget -q -O - --header "Authorization: Bearer $INFERD_ADMIN_API_KEY" --header "Content-Type: application/json" --post-data "{\"lora_name\": \"qv\", \"lora_path\": \"qv\"}" http://127.0.0.1:8080/v1/load_lora_adapter' > "$tmp/load.txt" 2>&1 || true
    echo "    $(head -c 200 "$tmp/load.txt")"
    check "the adapter is listed after the in-container load" bash -c "curl -fsS '$url/v1/models' | grep -q '\"qv\"'"
    chat "$url" $smol 24 false ', "temperature": 0' > "$tmp/base.json" || true
    chat "$url" qv 24 false ', "temperature": 0' > "$tmp/qv.json" || true
    local base_text qv_text
    base_text=$(grep -o '"content":"[^"]*"' "$tmp/base.json" | head -1)
    qv_text=$(grep -o '"content":"[^"]*"' "$tmp/qv.json" | head -1)
    echo "    base: ${base_text:0:100}"
    echo "    qv:   ${qv_text:0:100}"
    check "the adapter answers, differently from the base model" bash -c '[ -n "$2" ] && [ "$1" != "$2" ]' _ "$base_text" "$qv_text"
  else
    echo "    no SmolLM2 test adapters (tests/fixtures/generated/smollm2-lora; scripts/test.sh makes them): adapter check skipped"
  fi

  local h=""
  for _ in $(seq 40); do
    h=$(docker inspect -f '{{.State.Health.Status}}' "$c")
    [ "$h" = healthy ] && break
    sleep 0.5
  done
  check "Docker's HEALTHCHECK says healthy ($h)" test "$h" = healthy
  check "the server runs as uid 10001" test "$(docker exec "$c" busybox id -u)" = 10001
  check "PID 1 is tini" bash -c "docker exec '$c' busybox cat /proc/1/cmdline | tr '\0' ' ' | grep -q '^/usr/bin/tini -- /usr/local/bin/inferd'"

  log "inferd:cpu: docker stop while a stream runs"
  chat "$url" $smol 160 true ', "ignore_eos": true, "stream_options": {"include_usage": true}' > "$tmp/drain.txt" &
  local curl_pid=$!
  local n
  for _ in $(seq 200); do
    n=$(grep -c '"delta"' "$tmp/drain.txt" 2>/dev/null) || true
    [ "${n:-0}" -ge 5 ] && break
    sleep 0.05
  done
  local before t0 t1
  before=$(grep -c '"delta"' "$tmp/drain.txt" || true)
  t0=$(now)
  docker stop -t 60 "$c" >/dev/null
  t1=$(now)
  wait "$curl_pid" || true
  local stop_s usage
  stop_s=$(secs "$t0" "$t1")
  usage=$(grep -o '"completion_tokens":[0-9]*' "$tmp/drain.txt" | tail -1 | cut -d: -f2)
  echo "    stream had $before chunks when stopped; docker stop took $stop_s s; completion_tokens ${usage:-none}"
  check "the running stream was drained to its end (160 tokens, [DONE])" bash -c \
    "[ '${usage:-0}' = 160 ] && tail -3 '$tmp/drain.txt' | grep -q '^data: \[DONE\]'"
  check "exit status 0 after SIGTERM ($(docker inspect -f '{{.State.ExitCode}}' "$c"))" test "$(docker inspect -f '{{.State.ExitCode}}' "$c")" = 0
  check "stopped well before docker's 60 s SIGKILL ($stop_s s)" awk -v s="$stop_s" 'BEGIN { exit !(s < 30) }'
  check "inferd logged the drain" bash -c "docker logs '$c' 2>&1 | grep -q 'shutdown signal received, draining requests'"
  printf '%s\n' "$stop_s" > "$tmp/stop_stream_s"

  log "inferd:cpu: the onnx backend (tiny ONNX test model, the image's ONNX Runtime)"
  c=$(start inferd-check-cpu-onnx $image -v "$onnx_dir:/models/tiny-qwen2:ro" -- --backend onnx --model /models/tiny-qwen2 --model-id tiny)
  check "onnx model starts" wait_health "$c" 120
  url="$(base_url "$c")"
  chat "$url" tiny 8 false > "$tmp/onnx.json" || true
  check "onnx chat completion" grep -q '"finish_reason"' "$tmp/onnx.json"
  check "log says the ONNX session runs on the CPU provider" bash -c "docker logs '$c' 2>&1 | grep -q 'ONNX session ready.*provider=cpu'"
  t0=$(now); docker stop -t 60 "$c" >/dev/null; t1=$(now)
  echo "    idle docker stop took $(secs "$t0" "$t1") s"
  check "idle stop under 5 s ($(secs "$t0" "$t1") s), exit status 0" bash -c \
    "awk -v s=$(secs "$t0" "$t1") 'BEGIN { exit !(s < 5) }' && [ \"\$(docker inspect -f '{{.State.ExitCode}}' '$c')\" = 0 ]"
}

check_cuda() {
  ensure_image cuda
  local image=inferd:cuda size
  log "inferd:cuda: image"
  size=$(docker image inspect -f '{{.Size}}' $image)
  echo "    size $((size / 1000000)) MB"
  docker run --rm --entrypoint busybox $image du -sm /usr/local/lib/inferd/nvidia /usr/local/lib/inferd/onnxruntime /usr/local/bin/inferd | sed 's/^/    /'
  check "runs as user 10001:10001" test "$(docker image inspect -f '{{.Config.User}}' $image)" = 10001:10001
  check "NVIDIA container toolkit variables (compute, cuda>=13.0)" bash -c \
    "docker image inspect -f '{{json .Config.Env}}' $image | grep -q 'NVIDIA_DRIVER_CAPABILITIES=compute,utility' && docker image inspect -f '{{json .Config.Env}}' $image | grep -q 'NVIDIA_REQUIRE_CUDA=cuda>=13.0'"
  check "inferd --version" docker run --rm --entrypoint /usr/local/bin/inferd $image --version
  # Each cubin in the embedded fatbin keeps its ptxas command line ("-arch sm_90 -m 64").
  docker run --rm --entrypoint busybox $image strings /usr/local/bin/inferd > "$tmp/strings.txt" || true
  check "the binary has inferd's kernels as cubins for sm_80, sm_86, sm_89, sm_90" bash -c \
    "for a in 80 86 89 90; do grep -q -- \"-arch sm_\$a \" '$tmp/strings.txt' || exit 1; done"
  # ldd of everything inferd or ONNX Runtime loads; the only library allowed missing is the driver's.
  docker run --rm --entrypoint sh $image -c \
    'for f in /usr/local/bin/inferd /usr/local/lib/inferd/onnxruntime/*.so* /usr/local/lib/inferd/nvidia/*; do echo "== $f"; ldd "$f"; done' > "$tmp/ldd.txt" 2>&1 || true
  local missing
  missing=$(grep 'not found' "$tmp/ldd.txt" | awk '{print $1}' | sort -u | tr '\n' ' ')
  echo "    not found by the loader: ${missing:-nothing}"
  check "the loader finds every library but the driver's libcuda.so.1" test "$missing" = "libcuda.so.1 "
  check "ldconfig knows cuBLAS, cuBLASLt, cudart, cuRAND, cuDNN" bash -c \
    "docker run --rm --entrypoint ldconfig $image -p > '$tmp/ldconfig.txt'; for l in libcublas.so.13 libcublasLt.so.13 libcudart.so.13 libcurand.so.10 libcudnn.so.9 libcudnn_graph.so.9 libcudnn_engines_precompiled.so.9; do grep -q \"\$l \" '$tmp/ldconfig.txt' || exit 1; done"
  check "build_cuda.sh and docker/requirements-cuda-build.txt pin the same nvcc wheels" bash -c \
    "[ \"\$(sed -n 's/^WHEELS=\"\(.*\)\"/\1/p' scripts/build_cuda.sh | tr ' ' '\n' | sort)\" = \"\$(grep -o '^[a-z0-9-]*==[0-9.]*' docker/requirements-cuda-build.txt | sort)\" ]"

  log "inferd:cuda: --device cuda:0 without a GPU (no driver in this container)"
  local out rc t0
  t0=$(now)
  rc=0; out=$(timeout 120 docker run --rm -v "$models_dir:/models:ro" $image serve --model "$model_file" --device cuda:0 2>&1) || rc=$?
  echo "$out" | grep -iE 'error|libcuda' | tail -2 | sed 's/^/    /'
  check "candle on cuda:0 stops (status $rc, $(secs "$t0" "$(now)") s) naming libcuda.so.1 and the driver" bash -c \
    "[ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q 'the NVIDIA driver library (libcuda.so.1) is not installed' <<< \"\$1\"" _ "$out"
  rc=0; out=$(timeout 120 docker run --rm -v "$onnx_dir:/models/tiny-qwen2:ro" $image serve --backend onnx --model /models/tiny-qwen2 --device cuda:0 2>&1) || rc=$?
  echo "$out" | grep -iE 'error|libcuda' | tail -2 | cut -c1-400 | sed 's/^/    /'
  check "onnx on cuda:0 stops (status $rc) naming libcuda.so.1" bash -c \
    "[ $rc -ne 0 ] && [ $rc -ne 124 ] && grep -q 'libcuda.so.1' <<< \"\$1\"" _ "$out"

  log "inferd:cuda: the same image on the CPU"
  local c url
  c=$(start inferd-check-cuda-cpu $image -v "$models_dir:/models:ro" -- --model "$model_file" --model-id smollm2 --device cpu)
  check "candle on the CPU starts" wait_health "$c" 120
  url="$(base_url "$c")"
  chat "$url" smollm2 8 false > "$tmp/cpu.json" || true
  check "candle CPU chat completion" grep -q '"finish_reason"' "$tmp/cpu.json"
  docker stop -t 60 "$c" >/dev/null
  c=$(start inferd-check-cuda-onnx $image -v "$onnx_dir:/models/tiny-qwen2:ro" -- --backend onnx --model /models/tiny-qwen2 --model-id tiny --device cpu)
  check "onnx (onnxruntime-gpu's library) on the CPU starts" wait_health "$c" 120
  url="$(base_url "$c")"
  chat "$url" tiny 8 false > "$tmp/onnx-cpu.json" || true
  check "onnx CPU chat completion" grep -q '"finish_reason"' "$tmp/onnx-cpu.json"
  docker stop -t 60 "$c" >/dev/null
}

[ "$which" = cuda ] || check_cpu
[ "$which" = cpu ] || check_cuda
printf '\n%d passed, %d failed\n' "$pass" "$fail"
[ "$fail" = 0 ]
