#!/usr/bin/env bash
# Builds the sdist of the committed HEAD and, from it, the wheel (`python -m build --no-isolation`), installs each
# into its own fresh virtual environment with --no-build-isolation, and runs one loss forward and backward there.
#
# Usage: bash tools/dist_check.sh [python]   (default .venv/bin/python: it must have torch, setuptools, pybind11,
# ninja, numpy). CPU-only (KDKERNELS_FORCE_CPU=1) unless DIST_CHECK_CUDA=1: what is checked here is packaging.
# The fresh environments see the build environment's torch through a .pth line (torch "preinstalled", without
# copying gigabytes); that line does not process the build environment's own .pth files, so its editable
# kdkernels stays invisible and the import must come from the installed distribution (asserted below).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${1:-$ROOT/.venv/bin/python}"
W="$(mktemp -d)"
trap 'rm -rf "$W"' EXIT
if [[ "${DIST_CHECK_CUDA:-0}" != 1 ]]; then export KDKERNELS_FORCE_CPU=1 KDKERNELS_EMU=0; unset KDKERNELS_FORCE_CUDA; fi
"$PY" -m pip install -q "build>=1"

t0=$(date +%s)
# From a copy without build outputs, so nothing of the checkout's own build leaks into the sdist.
git -C "$ROOT" archive --format=tar HEAD | (mkdir -p "$W/src" && tar -x -C "$W/src")
"$PY" -m build --no-isolation --outdir "$W/dist" "$W/src"   # the sdist, then the wheel built from that sdist
echo "dist_check: built $(cd "$W/dist" && ls | tr '\n' ' ')in $(( $(date +%s) - t0 )) s"

host_site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
smoke='
import sys, torch, kdkernels
assert kdkernels.__file__.startswith(sys.prefix), f"kdkernels imported from {kdkernels.__file__}, not {sys.prefix}"
g = torch.Generator().manual_seed(0)
z = torch.randn(5, 37, generator=g, requires_grad=True)
t, ids = kdkernels.teacher_topk(torch.randn(5, 37, generator=g), 7)
loss = kdkernels.topk_kl_div(z, t, ids)
loss.backward()
value = float(loss.detach())
assert value > 0 and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0, (value, z.grad)
print("dist_check:", kdkernels.__file__, kdkernels.build_info()["kdkernels"], "loss", value)
'
install() {  # $1 = label, $2 = artifact
    local v="$W/venv-$1"
    "$PY" -m venv "$v"
    local site; site="$("$v/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    echo "$host_site" >"$site/_host_torch.pth"
    # The setuptools that venv bundles (65 on Python 3.11) would shadow the build environment's (>= 77, which
    # pyproject.toml's build requirements ask for); a user building without isolation has the newer one.
    "$v/bin/python" -m pip uninstall -q -y setuptools 2>/dev/null || true
    t0=$(date +%s)
    # --ignore-installed: the host's kdkernels metadata is visible through the .pth line and must not count.
    "$v/bin/python" -m pip install -q --no-build-isolation --no-deps --no-index --ignore-installed "$2"
    (cd "$W" && "$v/bin/python" -c "$smoke")
    echo "dist_check: $1 installed and ran in $(( $(date +%s) - t0 )) s"
}
install wheel "$(ls "$W"/dist/kdkernels-*.whl)"
install sdist "$(ls "$W"/dist/kdkernels-*.tar.gz)"
echo "dist_check: sdist and wheel OK"
