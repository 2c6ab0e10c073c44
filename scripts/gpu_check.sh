#!/usr/bin/env bash
# GPU check for gptedge's CUDA path, unattended, under 8 minutes.
#
#   scripts/gpu_check.sh            (run from anywhere; results go to $OUT, else ./gpu_check_out)
#
# 1. prints the machine (nvidia-smi), Python, PyTorch and onnxruntime versions, and whether
#    onnxruntime offers CUDAExecutionProvider;
# 2. if it does not, creates .gpu-venv (with the system site packages, so PyTorch stays) and
#    pip-installs onnxruntime-gpu there (needs network or a local wheel index via PIP_FIND_LINKS);
# 3. makes `import gptedge` work (editable install without network, else a symlinked package tree);
# 4. runs the CUDA tests (pytest -m cuda) and a CUDA benchmark (an fp16 cuda bundle of a random
#    GPT-2-124M-shaped model exported on the spot, then the `gptedge bench` measurements).
# Everything is logged to $OUT/gpu_check.log; $OUT/summary.txt has one line per step.
# Exit status: 0 when every step passed, 1 otherwise. GPU_CHECK_NO_INSTALL=1 skips step 2.

set -uo pipefail
START=$(date +%s)
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
OUT="${OUT:-$REPO/gpu_check_out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
SUMMARY="$OUT/summary.txt"
: >"$SUMMARY"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1
PY="${PYTHON:-$(command -v python3 || command -v python)}"
FAILED=0

elapsed() { echo $(( $(date +%s) - START )); }
section() { echo; echo "=== $* [$(elapsed) s]"; }
record() {  # record STEP STATUS; a status not starting with "ok" or "skipped" fails the check
  echo "$1: $2" >>"$SUMMARY"; echo "-> $1: $2"
  case "$2" in ok*|skipped*) ;; *) FAILED=1 ;; esac
}
has_cuda_ep() {
  "$1" - <<'EOF' 2>/dev/null
import sys, onnxruntime as ort
sys.exit(0 if "CUDAExecutionProvider" in ort.get_available_providers() else 1)
EOF
}

section "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "nvidia-smi not found"
section "python packages ($PY)"
"$PY" - <<'EOF'
import importlib, platform, sys
print("python", sys.version.split()[0], platform.machine())
for name in ("torch", "onnxruntime", "onnx", "tokenizers", "numpy"):
    try:
        m = importlib.import_module(name)
        extra = ""
        if name == "torch":
            extra = f" cuda={m.version.cuda} available={m.cuda.is_available()}"
        if name == "onnxruntime":
            extra = f" providers={m.get_available_providers()}"
        print(f"{name} {m.__version__}{extra}")
    except Exception as exc:  # report, do not stop: the next steps install what is missing
        print(f"{name}: not importable ({type(exc).__name__}: {exc})")
EOF

# -- an onnxruntime with CUDAExecutionProvider ---------------------------------------------------------
RUN_PY="$PY"
if has_cuda_ep "$PY"; then
  record "onnxruntime CUDAExecutionProvider" "ok (system python)"
elif [ -n "${GPU_CHECK_NO_INSTALL:-}" ]; then
  record "onnxruntime CUDAExecutionProvider" "MISSING (GPU_CHECK_NO_INSTALL set: not installing onnxruntime-gpu)"
else
  section "installing onnxruntime-gpu into .gpu-venv (system site packages kept for PyTorch)"
  if [ ! -x .gpu-venv/bin/python ]; then "$PY" -m venv --system-site-packages .gpu-venv; fi
  RUN_PY="$REPO/.gpu-venv/bin/python"
  timeout 150 "$RUN_PY" -m pip install --disable-pip-version-check -q "onnxruntime-gpu>=1.20" \
    || echo "pip could not install onnxruntime-gpu (no network? set PIP_FIND_LINKS to a folder of wheels)"
  for pkg in numpy tokenizers onnx onnxscript safetensors pytest hypothesis; do
    "$RUN_PY" -c "import $pkg" 2>/dev/null || timeout 60 "$RUN_PY" -m pip install --disable-pip-version-check -q "$pkg" \
      || echo "pip could not install $pkg"
  done
  if has_cuda_ep "$RUN_PY"; then
    record "onnxruntime CUDAExecutionProvider" "ok (.gpu-venv)"
  else
    record "onnxruntime CUDAExecutionProvider" "MISSING: install onnxruntime-gpu matching the CUDA driver"
  fi
fi
"$RUN_PY" -c "import onnxruntime as o; print('using onnxruntime', o.__version__, o.get_available_providers())"

# -- import gptedge ------------------------------------------------------------------------------------------
section "making gptedge importable"
if ! "$RUN_PY" -c "import gptedge.runtime.model, gptedge.export.exporter" 2>/dev/null; then
  timeout 60 "$RUN_PY" -m pip install --disable-pip-version-check -q --no-deps --no-build-isolation -e . 2>/dev/null \
    || true
fi
if ! "$RUN_PY" -c "import gptedge.runtime.model" 2>/dev/null; then
  # No pip: mirror the package-dir mapping of pyproject.toml with symlinks.
  TREE="$OUT/.pkgtree"
  rm -rf "$TREE" && mkdir -p "$TREE/gptedge"
  for f in "$REPO"/gptedge/*; do ln -s "$f" "$TREE/gptedge/$(basename "$f")"; done
  for sub in runtime export quantize train; do [ -d "$REPO/$sub" ] && ln -s "$REPO/$sub" "$TREE/gptedge/$sub"; done
  export PYTHONPATH="$TREE${PYTHONPATH:+:$PYTHONPATH}"
fi
if "$RUN_PY" -c "import gptedge.runtime.model; print('gptedge from', gptedge.__file__)"; then
  record "import gptedge" ok
else
  record "import gptedge" "FAILED"
fi

# -- CUDA tests -----------------------------------------------------------------------------------------------------
section "pytest -m cuda"
if has_cuda_ep "$RUN_PY"; then
  # Only the files that have CUDA tests: another file's import error must not fail this check.
  CUDA_FILES=$(grep -l "mark.cuda" tests/test_*.py | tr '\n' ' ')
  echo "files with CUDA tests: $CUDA_FILES"
  timeout 200 "$RUN_PY" -m pytest -m cuda $CUDA_FILES -q -rs -p no:cacheprovider --junitxml="$OUT/pytest_cuda.xml"
  rc=$?
  [ $rc -eq 0 ] && record "pytest -m cuda" ok || record "pytest -m cuda" "FAILED (exit $rc)"
else
  record "pytest -m cuda" "FAILED (no CUDAExecutionProvider)"
fi

# -- CUDA benchmark -----------------------------------------------------------------------------------------------
section "CUDA benchmark (fp16 bundle of a random GPT-2-124M-shaped model, exported now)"
if has_cuda_ep "$RUN_PY"; then
  SIZE=small
  [ "$(elapsed)" -gt 330 ] && SIZE=tiny  # keep the whole check under 8 minutes
  timeout 130 "$RUN_PY" scripts/gpu_check.py "$OUT/work" --size "$SIZE"
  rc=$?
  [ -f "$OUT/work/bench_cuda.json" ] && cp "$OUT/work/bench_cuda.json" "$OUT/bench_cuda.json"
  rm -rf "$OUT/work"
  [ $rc -eq 0 ] && record "cuda bench ($SIZE)" ok || record "cuda bench ($SIZE)" "FAILED (exit $rc)"
else
  record "cuda bench" "skipped"
fi

rm -rf "$OUT/.pkgtree"
section "done in $(elapsed) s"
cat "$SUMMARY"
exit $FAILED
