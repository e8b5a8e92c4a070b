#!/usr/bin/env bash
# The GPU check (issue 19): what the machine has, the CUDA tests, the paper-size benchmark, then the whole suite.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Run from the repository root on a machine with an NVIDIA GPU and the project's dependencies importable (pip install
# -e '.[test]'; on a machine without network, carry wheels and put them on PYTHONPATH). Each step has a hard time limit
# (seconds, overridable: LIMIT_TESTS, LIMIT_BENCH, LIMIT_BATCH4, LIMIT_SUITE; 0 skips a step), its output goes to
# OUTDIR/<step>.log, and one line per step (exit status, seconds) to OUTDIR/summary.txt. A failing step does not stop
# the next one. Written for a 15-minute lease: at most 9.5 minutes with the default limits.
set -u
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
py=${PYTHON:-python3}

step() {  # step NAME LIMIT COMMAND...
    local name=$1 limit=$2 start rc
    shift 2
    if [ "$limit" = 0 ]; then echo "== $name skipped (limit 0)" | tee -a "$out/summary.txt"; return; fi
    echo "== $name (limit ${limit} s): $*"
    start=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$out/$name.log" 2>&1
    rc=$?
    tail -n 40 "$out/$name.log"
    echo "== $name rc=$rc $(( $(date +%s) - start )) s$([ $rc = 124 ] && echo ' (timed out)')" | tee -a "$out/summary.txt"
}

step env 60 bash -c "nvidia-smi; $py - <<'EOF'
import platform, sys
import accelerate, safetensors, torch, transformers
print('python', sys.version.split()[0], platform.machine())
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version())
print('transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'safetensors', safetensors.__version__)
print('device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'NO CUDA DEVICE',
      torch.cuda.get_device_capability() if torch.cuda.is_available() else '')
EOF"
# In parallel where pytest-xdist is there.
xdist=$("$py" -c "import xdist" 2>/dev/null && echo "-n 8")
# The tests that a device can break: test_devices.py runs each property on the CPU and on CUDA; the training tests go
# through accelerate, which puts them on the GPU.
step tests-cuda "${LIMIT_TESTS:-150}" "$py" -m pytest -q -p no:cacheprovider $xdist -rs tests/test_devices.py tests/test_train.py \
    tests/test_model.py tests/test_generate.py tests/test_checkpoint.py
step bench "${LIMIT_BENCH:-200}" "$py" benchmarks/gpu.py --prompt-tokens 256 --new-tokens 256 \
    --recompute-new-tokens 256 --time-budget "$(( ${LIMIT_BENCH:-200} - 60 ))" --out "$out/gpu.json"
step bench-batch4 "${LIMIT_BATCH4:-90}" "$py" benchmarks/gpu.py --batch 4 --prompt-tokens 256 --new-tokens 16 \
    --recompute-new-tokens 16 --time-budget "$(( ${LIMIT_BATCH4:-90} - 45 ))" --out "$out/gpu-batch4.json"
# The whole suite (tests whose optional dependencies are missing fail to collect and are listed; the data-set tests
# skip without ../shared/data).
step suite "${LIMIT_SUITE:-120}" "$py" -m pytest -q -p no:cacheprovider $xdist --continue-on-collection-errors
cat "$out/summary.txt"
