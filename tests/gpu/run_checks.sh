#!/usr/bin/env bash
# The GPU checks of issue 5, in one go, on a CUDA host without a package index:
#   1. build ckptio into a private directory (pip --no-build-isolation --target: uses the
#      installed scikit-build-core, pybind11, cmake, ninja; downloads nothing),
#   2. run the cuda-marked tests (tests/gpu; the CPU pipeline tests run in CI),
#   3. run the GPU benchmark (tests/gpu/bench_gpu.py): ~2 GB and ~12 GB bf16 state dicts and
#      20,000 small tensors, page cache -> GPU with ckptio, torch.load, torch.load(mmap)+.cuda()
#      and safetensors; raw pinned H2D and page-cache read bandwidth; GPU saves vs torch.save;
#      host RSS growth; one markdown table and the targets as PASS/FAIL.
# About 6 minutes in all on an H200 host. Logs and the table go to $OUT (default ./gpu-out).
#
#   bash tests/gpu/run_checks.sh
#
# Exit status: non-zero when the build or a test fails (benchmark targets are reported, not
# enforced). Files are written under a temporary directory in ${TMPDIR:-/tmp} and removed.
set -u -o pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu-out}"
TMP="${TMPDIR:-/tmp}"
mkdir -p "$OUT"
t0=$(date +%s)
step() { echo "== $* (t=$(( $(date +%s) - t0 )) s)"; }
status=0

step environment
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
    --format=csv 2>&1 || true
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  echo "cpus $(nproc)"; free -g | head -2; df -h "$TMP" | tail -1
} 2>&1 | tee "$OUT/env.txt"

step build
# Into a private directory (--target): nothing in the host's Python changes, and an
# externally managed (PEP 668) system Python is no obstacle.
SITE="$TMP/ckptio-gpu-site"
rm -rf "$SITE"
if ! "$PY" -m pip install --no-build-isolation --no-deps -q --target "$SITE" . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "BUILD FAILED (log: $OUT/build.log)"
  exit 1
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import ckptio, ckptio._core as c; print('ckptio', ckptio.__version__, 'from', ckptio.__file__)" \
  2>&1 | tee -a "$OUT/env.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "IMPORT FAILED"; exit 1; }

step "cuda tests"
pytest_args=(-q -p no:cacheprovider --basetemp "$TMP/ckptio-gpu-pytest")
gpu_tests=(tests/gpu)
if "$PY" -c "import hypothesis" 2>/dev/null; then
  gpu_tests+=(tests/test_roundtrip.py)  # its cuda-marked round trip; needs hypothesis to import
fi
timeout 200 "$PY" -m pytest "${pytest_args[@]}" -m cuda "${gpu_tests[@]}" 2>&1 | tee "$OUT/tests_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
rm -rf "$TMP/ckptio-gpu-pytest"

step benchmark
left=$(( 345 - ($(date +%s) - t0) ))
budget=$(( left > 120 ? left - 40 : 80 ))
timeout $(( budget + 90 )) "$PY" tests/gpu/bench_gpu.py --dir "$TMP" --out "$OUT" --budget-s "$budget" \
  2>&1 | tee "$OUT/bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
rm -rf "$TMP"/ckptio-bench-gpu-* "$SITE"

step "done, status $status"
exit $status
