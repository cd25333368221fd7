#!/usr/bin/env bash
# Coverage-guided fuzzing of everything a client controls (issue 19 item 2; docs/reliability.md,
# "Fuzzing"): runs each cargo-fuzz target of fuzz/ for a fixed time and prints how many inputs
# each executed. A crash (panic, 5xx, malformed answer, hang, RSS over the limit) stops that
# target and leaves its input in fuzz/artifacts/<target>/; the script then exits 1.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     default: 300 s, every target
#   FUZZ_JOBS=2 scripts/fuzz.sh 600 chat                 libFuzzer's -fork=N (N processes)
#
# Targets (input formats in fuzz/harness.rs): chat, completions, tokenize, admin, adapter,
# raw_http. New inputs the fuzzer finds go to fuzz/work/<target>/ (not committed); the seed corpus
# fuzz/corpus/<target>/ (scripts/fuzz_seeds.py) is read, never written. CI does not run this
# (the instrumented build alone takes ~15 min on 2 cores): tests/fuzz_corpus.rs replays the corpus
# and the regressions through the same harness and mutates them for a few seconds per target.
#
# Needs cargo-fuzz (installed from crates.io when missing) and a nightly toolchain, or stable with
# RUSTC_BOOTSTRAP=1 (used when no nightly is installed); no sanitizer (--sanitizer none): the code
# under test is safe Rust over candle's kernels, and ASan would slow every step several times.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

secs="${1:-300}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then targets=(chat completions tokenize admin adapter raw_http); fi

if rustup run nightly rustc -V >/dev/null 2>&1; then
  toolchain=(+nightly)
else
  echo "no nightly toolchain: stable with RUSTC_BOOTSTRAP=1"
  toolchain=()
  export RUSTC_BOOTSTRAP=1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked --version 0.13.2
fi
if [ ! -f tests/fixtures/generated/tiny-llama/config.json ]; then
  PY="${PYTHON:-.venv/bin/python}"
  [ -x "$PY" ] || PY=python3
  "$PY" scripts/make_tiny_model.py tests/fixtures/generated
fi

cd fuzz
fuzz=(cargo "${toolchain[@]}" fuzz)
flags=(-a --sanitizer none)
"${fuzz[@]}" build "${flags[@]}"

summary=()
failed=0
for t in "${targets[@]}"; do
  mkdir -p "work/$t" "artifacts/$t"
  dict=dict/json.dict
  [ "$t" = raw_http ] && dict=dict/http.dict
  extra=()
  [ "${FUZZ_JOBS:-1}" -gt 1 ] && extra=(-fork="$FUZZ_JOBS")
  [ "$t" = adapter ] && extra+=(-max_len=32768)
  echo "==> $t: $secs s"
  set +e
  "${fuzz[@]}" run "${flags[@]}" "$t" "work/$t" "corpus/$t" -- \
    -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -dict="$dict" -print_final_stats=1 \
    -artifact_prefix="artifacts/$t/" "${extra[@]}" 2>&1 | tee "work/$t.log" | grep -E "^#[0-9]+[[:space:]]+(INITED|DONE)|ERROR|panicked|SUMMARY|failure" || true
  rc=${PIPESTATUS[0]}
  set -e
  execs=$( (grep -Eo "stat::number_of_executed_units: *[0-9]+" "work/$t.log" || true) | grep -Eo "[0-9]+$" | tail -1 || true)
  [ -n "$execs" ] || execs=$( (grep -Eo "^#[0-9]+" "work/$t.log" || true) | tail -1 | tr -d '#')
  cov=$( (grep -Eo "cov: [0-9]+" "work/$t.log" || true) | tail -1 | grep -Eo "[0-9]+" || true)
  corpus=$(find "work/$t" -type f | wc -l)
  if [ "$rc" -ne 0 ]; then
    failed=1
    summary+=("$t: FAILED after ${execs:-?} executions (exit $rc); input in fuzz/artifacts/$t/, log fuzz/work/$t.log")
  else
    summary+=("$t: ${execs:-?} executions in $secs s, coverage ${cov:-?} edges, $corpus new corpus inputs")
  fi
done

echo
echo "==> summary"
printf '%s\n' "${summary[@]}"
exit "$failed"
