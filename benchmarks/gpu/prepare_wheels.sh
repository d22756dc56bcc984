#!/usr/bin/env bash
# Download the wheels the GPU suite needs on the lent GPU machine into .whl/ (git-ignored).
#
# That machine runs Python 3.12 with torch 2.11 and triton 3.6 and reaches no package index;
# it has numpy, scipy, pytest, pytest-xdist and hypothesis, but not TorchJD (section 4) nor
# TorchJD's quadratic-program solver (qpsolvers + quadprog, for UPGrad). So they travel as
# wheels for CPython 3.12 on manylinux x86-64, without their dependencies (the machine has
# the rest). Run from anywhere; the device command installs them with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"

wheels=(torchjd==0.18.0 qpsolvers==4.13.0 quadprog==0.1.14)
rm -rf .whl
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 \
    -d .whl "${wheels[@]}"

count=$(find .whl -type f -name '*.whl' | wc -l)
if [ "$count" -ne "${#wheels[@]}" ]; then
    echo "expected ${#wheels[@]} wheels in .whl, found $count" >&2
    exit 1
fi
if git check-ignore -q .whl/x.whl; then :; else
    echo ".whl/ is not ignored by git: add /.whl/ to $exclude" >&2
    exit 1
fi
size=$(du -sk .whl | cut -f1)
if [ "$size" -gt $((60 * 1024)) ]; then
    echo ".whl holds ${size} KiB, over the 60 MiB the device call can carry beside the tree" >&2
    exit 1
fi
echo "wheels in $root/.whl (${size} KiB):"
ls -1 .whl
