#!/usr/bin/env bash
# Install the ONNX Runtime shared library the onnx backend loads at run time, from the pinned
# PyPI wheel (onnxruntime==1.31.1, CPU build), sha256-verified, into runtimes/onnxruntime/
# (gitignored). Prints the library's path. inferd finds it there without configuration;
# ORT_DYLIB_PATH or [server] onnxruntime_library point elsewhere (e.g. an onnxruntime-gpu build).
#
#   scripts/fetch_onnxruntime.sh
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
dest="${INFERD_RUNTIMES_DIR:-$root/runtimes}/onnxruntime"
PY="${PYTHON:-python3}"
VERSION=1.31.1
die() { echo "fetch_onnxruntime: $*" >&2; exit 1; }

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64)
    PLATFORM=manylinux_2_28_x86_64
    # The wheel for CPython 3.11 on this platform; the library inside is the same for every Python.
    WHEEL_SHA=5752bd508126ae7c49894d3b9d2e83f0c3d487319246d04c444b393308d7ad7f
    LIB=libonnxruntime.so; MEMBER="onnxruntime/capi/libonnxruntime.so.$VERSION" ;;
  Darwin-arm64)
    PLATFORM=macosx_13_0_arm64; WHEEL_SHA=""
    LIB=libonnxruntime.dylib; MEMBER="onnxruntime/capi/libonnxruntime.$VERSION.dylib" ;;
  *) die "no pinned ONNX Runtime wheel for $(uname -s)-$(uname -m); set ORT_DYLIB_PATH to a libonnxruntime $VERSION" ;;
esac

out="$dest/$LIB"
stamp="$dest/.version"
if [ -f "$out" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$VERSION" ]; then echo "$out"; exit 0; fi

mkdir -p "$dest"
tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
"$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
  --python-version 3.11 --implementation cp --platform "$PLATFORM" -d "$tmp" "onnxruntime==$VERSION" >&2 \
  || die "cannot download onnxruntime==$VERSION from PyPI"
whl="$(ls "$tmp"/*.whl)"
if [ -n "$WHEEL_SHA" ]; then
  [ "$(sha256sum "$whl" | cut -d' ' -f1)" = "$WHEEL_SHA" ] || die "sha256 mismatch for $(basename "$whl")"
fi
"$PY" - "$whl" "$MEMBER" "$out" <<'PYEOF'
import shutil, sys, zipfile
whl, member, out = sys.argv[1:]
with zipfile.ZipFile(whl) as z:
    with z.open(member) as src, open(out + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PYEOF
mv "$out.part" "$out"
echo "$VERSION" > "$stamp"
echo "$out"
