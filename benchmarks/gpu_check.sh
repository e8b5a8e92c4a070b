#!/usr/bin/env bash
# The GPU check (issue 19): what the machine has, the whole suite, then the paper-size benchmark (generation alone,
# training with the eager and the SDPA small attention, and compiled).
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Run from the repository root on a machine with an NVIDIA GPU and the project's dependencies importable (pip install
# -e '.[test]'; on a machine without network, carry wheels and put them on PYTHONPATH). Each step has a hard time limit
# (seconds, overridable: LIMIT_SUITE, LIMIT_GEN, LIMIT_GEN1, LIMIT_TRAIN, LIMIT_COMPILE; 0 skips a step), its output
# goes to OUTDIR/<step>.log, and one line per step (exit status, seconds) to OUTDIR/summary.txt. A failing step does
# not stop the next one. Written for a 15-minute lease: at most 9.3 minutes with the default limits.
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
xdist=$("$py" -c "import xdist" 2>/dev/null && echo "-n 14")
# The whole suite: test_devices.py runs each property on the CPU and on CUDA; the training tests go through
# accelerate, which puts them on the GPU (tests whose optional dependencies are missing are skipped or fail to
# collect and are listed; the data-set tests skip without ../shared/data).
step suite "${LIMIT_SUITE:-130}" "$py" -m pytest -q -p no:cacheprovider $xdist -rs --continue-on-collection-errors
# Generation alone, each in a fresh process (issue 19's 256 + 256): torch's default CPU threads, then one thread.
step gen "${LIMIT_GEN:-60}" "$py" benchmarks/gpu.py --skip-train --prompt-tokens 256 --new-tokens 256 \
    --recompute-new-tokens 64 --out "$out/gen.json"
step gen-1thread "${LIMIT_GEN1:-75}" "$py" benchmarks/gpu.py --skip-train --threads 1 --prompt-tokens 256 \
    --new-tokens 256 --recompute-new-tokens 256 --out "$out/gen-1thread.json"
# Training at the paper's sizes (batch 1, sequence 4096, checkpointing off): transformers' eager GPT-Neo attention,
# the SDPA one (llm_modules/gpt_neo_sdpa.py), and SDPA with torch.compile.
step train-eager "${LIMIT_TRAIN:-60}" "$py" benchmarks/gpu.py --skip-generation --checkpointing off \
    --out "$out/train-eager.json"
step train-sdpa "${LIMIT_TRAIN:-60}" "$py" benchmarks/gpu.py --skip-generation --checkpointing off --small-attn sdpa \
    --out "$out/train-sdpa.json"
step train-sdpa-compile "${LIMIT_COMPILE:-120}" "$py" benchmarks/gpu.py --skip-generation --checkpointing off \
    --small-attn sdpa --compile --out "$out/train-sdpa-compile.json"
cat "$out/summary.txt"
