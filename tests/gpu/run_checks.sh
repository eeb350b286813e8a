#!/usr/bin/env bash
# The GPU checks, in one go, on a CUDA host without network access. Expected time: about
# 6 to 8 minutes on one H100 or H200 (build 1-2 min, or seconds from a prebuilt wheel; cuda
# tests 1-2 min; benchmark 3-4 min); the benchmark gets what is left of 8 minutes.
#
#   1. install ckptio into a private directory, downloading nothing:
#        - from $CKPTIO_WHEEL when set (a wheel built elsewhere, see below), or
#        - built from this tree (pip --no-build-isolation: uses the host's scikit-build-core,
#          pybind11, cmake and ninja);
#      test dependencies the host lacks (pytest, hypothesis, numpy, safetensors) are installed
#      from $CKPTIO_WHEELHOUSE when set (a directory of wheels, see below);
#   2. run every cuda-marked test of the whole suite (pytest -m cuda tests: tests/gpu and the
#      cuda tests of test_async_save, test_load_into, test_roundtrip, test_safetensors);
#   3. run the GPU benchmark (tests/gpu/bench_gpu.py): ~2 GB and ~6 GB bf16 state dicts and
#      20,000 small tensors to the GPU with ckptio, torch.load, torch.load(mmap)+.cuda() and
#      safetensors, page cache warm (every method warmed up alike) and cold (the first load of
#      a fresh process, file evicted); raw pinned H2D and page-cache read bandwidth; GPU saves
#      vs torch.save; host RSS growth. Each row goes to $OUT/bench_gpu_rows.md as it is
#      measured; the full table and the targets (PASS/FAIL) to $OUT/bench_gpu.md at the end.
#
#   bash tests/gpu/run_checks.sh
#   CKPTIO_WHEEL=dist/ckptio-*.whl CKPTIO_WHEELHOUSE=wheels bash tests/gpu/run_checks.sh
#
# Making the wheels, on a machine with network access and the host's Python version and
# architecture (the wheel holds the compiled extension):
#   python -m pip wheel --no-deps --no-build-isolation -w dist .    # ckptio itself
#   python -m pip download -d wheels pytest hypothesis numpy safetensors   # test dependencies
# then copy the repository with dist/ and wheels/ to the GPU host.
#
# Exit status: non-zero when the install fails, a cuda test fails or cannot be collected (a
# missing test dependency), or ckptio's load is slower than torch.load(map_location="cuda")
# on a benchmark workload. Logs and tables go to $OUT (default ./gpu-out); files are written
# under ${TMPDIR:-/tmp} and removed.
set -u -o pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"
OUT="${OUT:-$PWD/gpu-out}"
TMP="${TMPDIR:-/tmp}"
TOTAL_S="${CKPTIO_CHECKS_SECONDS:-480}"  # the whole run: 8 minutes
mkdir -p "$OUT"
t0=$(date +%s)
elapsed() { echo $(( $(date +%s) - t0 )); }
step() { echo "== $* (t=$(elapsed) s)"; }
status=0

step environment
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.current,pcie.link.width.current \
    --format=csv 2>&1 || true
  "$PY" -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, \
'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"
  echo "cpus $(nproc)"; free -g | head -2; df -h "$TMP" | tail -1
} 2>&1 | tee "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "NO CUDA DEVICE: every cuda test would skip; nothing to check here"
  exit 1
fi

step install
# Into a private directory (--target): nothing in the host's Python changes, and an
# externally managed (PEP 668) system Python is no obstacle.
SITE="$TMP/ckptio-gpu-site"
rm -rf "$SITE"
install_ckptio() {
  if [ -n "${CKPTIO_WHEEL:-}" ]; then
    echo "from the prebuilt wheel $CKPTIO_WHEEL"
    "$PY" -m pip install --no-deps --no-index -q --target "$SITE" "$CKPTIO_WHEEL"
  else
    echo "built from this tree (--no-build-isolation)"
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -q --target "$SITE" .
  fi
}
if ! install_ckptio >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "INSTALL FAILED (log: $OUT/build.log). A host without scikit-build-core, pybind11, cmake"
  echo "or ninja: set CKPTIO_WHEEL to a wheel built elsewhere (see the header of this script)."
  exit 1
fi
head -1 "$OUT/build.log"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import ckptio, ckptio._core as c; print('ckptio', ckptio.__version__, 'from', ckptio.__file__)" \
  2>&1 | tee -a "$OUT/env.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || { echo "IMPORT FAILED"; exit 1; }

missing=()
for mod in pytest hypothesis numpy safetensors; do
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
done
if [ ${#missing[@]} -gt 0 ] && [ -n "${CKPTIO_WHEELHOUSE:-}" ]; then
  echo "test dependencies from $CKPTIO_WHEELHOUSE: ${missing[*]}"
  "$PY" -m pip install --no-index --find-links "$CKPTIO_WHEELHOUSE" -q --target "$SITE" \
    "${missing[@]}" >>"$OUT/build.log" 2>&1 || echo "(some did not install: see $OUT/build.log)"
  missing=()
  for mod in pytest hypothesis numpy safetensors; do
    "$PY" -c "import $mod" 2>/dev/null || missing+=("$mod")
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  # hypothesis: test_roundtrip and test_safetensors do not import; safetensors: the latter's
  # cuda test skips. Either way a cuda test does not run: the run fails, and says why.
  echo "MISSING TEST DEPENDENCIES: ${missing[*]} (set CKPTIO_WHEELHOUSE, see the header)"
  status=1
fi

step "cuda tests"
# Every cuda-marked test of the suite. A module that cannot be imported is a collection error
# (the run fails) but does not stop the others; -rs lists every skip (two GPUs, safetensors).
pytest_args=(-q -p no:cacheprovider -rs --continue-on-collection-errors
  --basetemp "$TMP/ckptio-gpu-pytest" -m cuda)
timeout 240 "$PY" -m pytest "${pytest_args[@]}" tests 2>&1 | tee "$OUT/tests_cuda.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
rm -rf "$TMP/ckptio-gpu-pytest"

step benchmark
# Whatever is left of TOTAL_S, less a margin for the report: the benchmark starts no new
# work past --budget-s, and rows already measured are in $OUT/bench_gpu_rows.md whatever
# happens (the timeout below kills it 60 s after its budget).
left=$(( TOTAL_S - $(elapsed) - 30 ))
budget=$(( left > 150 ? left - 60 : 90 ))
timeout $(( budget + 60 )) "$PY" tests/gpu/bench_gpu.py --dir "$TMP" --out "$OUT" --budget-s "$budget" \
  2>&1 | tee "$OUT/bench.log"
bench_status=${PIPESTATUS[0]}
if [ "$bench_status" -ne 0 ]; then
  status=1
  if [ "$bench_status" -eq 124 ]; then
    echo "BENCHMARK TIMED OUT: the rows measured so far ($OUT/bench_gpu_rows.md):"
    cat "$OUT/bench_gpu_rows.md" 2>/dev/null
  fi
fi
rm -rf "$TMP"/ckptio-bench-gpu-* "$SITE"

step "done, status $status"
exit $status
