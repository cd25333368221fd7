#!/usr/bin/env python3
"""Copies the named shared libraries out of the wheels in a folder (docker/Dockerfile.cuda).

    wheel_libs.py WHEEL_DIR DEST NAME...

Fails when a name is in none of the wheels, so that a wheel that changes its layout stops the
build instead of giving an image without a library.
"""
import glob
import os
import shutil
import sys
import zipfile

wheel_dir, dest, names = sys.argv[1], sys.argv[2], sys.argv[3:]
os.makedirs(dest, exist_ok=True)
found = {}
for whl in sorted(glob.glob(os.path.join(wheel_dir, "*.whl"))):
    with zipfile.ZipFile(whl) as z:
        for member in z.namelist():
            base = os.path.basename(member)
            if base in names and base not in found:
                out = os.path.join(dest, base)
                with z.open(member) as src, open(out, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                os.chmod(out, 0o755)
                found[base] = os.path.basename(whl)
missing = [n for n in names if n not in found]
if missing:
    sys.exit("wheel_libs: not in the wheels: " + ", ".join(missing))
for n in names:
    print(f"{n:42} {os.path.getsize(os.path.join(dest, n)) / 1e6:7.1f} MB  {found[n]}")
