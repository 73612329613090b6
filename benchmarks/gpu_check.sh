#!/usr/bin/env bash
# Issue 16's GPU check, one prepared script: the plugin measured on CUDA.
#
#   1. env:             nvidia-smi, torch / CUDA / Lightning versions, and that ess_train imports there
#   2. tests:           the device-marked tests (`pytest --device cuda -m device`) of the engine, op, mixer
#                       and callback test files
#   3. bench_ess:       entropy-ESS of 64 channels at L = 1024, 4096 vs the per-position SVD loop (>= 100x)
#   4. bench_mixers:    the zoo's Mamba forward vs its token loop (>= 5x), with GLA, S4D and attention
#   5. bench_callbacks: d_model 512, 4 layers, L 1024, batch 16, bf16 autocast: ESSMonitor every 50 steps
#                       (<= 5% of training time), ESSRegularizer every step (<= 1.3x step time)
#
# Each step has its own `timeout` (30 + 140 + 120 + 60 + 130 s: 8 minutes at most), a failed step does not
# stop the next, and the script ends with a summary (also in $OUT/summary.txt; exit status 1 if a step
# failed or timed out; a MISS of a target is reported, not a failure). Each step's output goes to
# $OUT/<step>.txt (6 files in all: the device tool brings back at most 8). OUT defaults to ./gpu_out.
#
# The device tool's call (from the repository root; nothing to carry: the image has torch, Lightning,
# pytest and transformers, and nothing here imports hydra, omegaconf or wandb):
#
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=540)        # carry: none (omit it)
#
# (8 minutes of steps + a machine start of 1-2 minutes: about 10 of the task's 15 device minutes. To rerun
# one part on the still-warm machine, e.g. TEST_FILES="tests/models/test_ops_scan.py" or one benchmark line.)
#
# Rehearsal on a CPU machine (quick sizes, a few minutes; QUICK=1 is the default when DEVICE=cpu):
#
#   DEVICE=cpu bash benchmarks/gpu_check.sh
#
# Variables: DEVICE (cuda), QUICK (1 on cpu, else 0), OUT (./gpu_out), PYTHON (./.venv/bin/python where it
# exists, else python3), TEST_FILES (the device-marked files below), TEST_WORKERS (4, with pytest-xdist).

set -u
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then QUICK=${QUICK:-1}; else QUICK=${QUICK:-0}; fi
OUT=${OUT:-./gpu_out}
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$([ "$DEVICE" = cpu ] && echo 1 || echo 4)}

DEVICE_TESTS=(
    tests/ess/test_ess_engine.py tests/ess/test_ess_float32.py tests/ess/test_ess_gradients.py
    tests/models/test_ops_scan.py tests/models/test_ops_linear_attention.py tests/models/test_ops_fft_conv.py
    tests/models/test_mixer_contract.py tests/callbacks/test_callbacks_monitor.py tests/callbacks/test_callbacks_regularizer.py
    tests/models/test_ops_triton_scan.py
)
if [ -n "${TEST_FILES:-}" ]; then
    read -r -a DEVICE_TESTS <<<"$TEST_FILES"
elif [ "$QUICK" = 1 ]; then  # rehearsal: the small files run, the selection of all of them is collected
    QUICK_TESTS=(tests/models/test_ops_fft_conv.py tests/models/test_ops_linear_attention.py)
fi

STEPS=()
RESULTS=()
T_START=$SECONDS

# step NAME TIMEOUT_S CMD...: runs CMD under `timeout`, its output to the terminal and $OUT/NAME.txt
step() {
    local name=$1 limit=$2 rc t0=$SECONDS
    shift 2
    echo
    echo "=== $name (timeout ${limit}s): $*"
    set -o pipefail
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    rc=$?
    set +o pipefail
    local verdict=ok
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then verdict="TIMEOUT (${limit}s)"; elif [ "$rc" != 0 ]; then verdict="FAIL (rc $rc)"; fi
    local targets
    targets=$(grep -cE '\| PASS \|$' "$OUT/$name.txt")
    local misses
    misses=$(grep -cE '\| MISS \|$' "$OUT/$name.txt")
    [ $((targets + misses)) -gt 0 ] && verdict="$verdict; targets: $targets PASS, $misses MISS"
    STEPS+=("$name")
    RESULTS+=("$verdict, $((SECONDS - t0))s")
    echo "=== $name: $verdict ($((SECONDS - t0))s)"
}

# what the env step prints (python -c "$ENV_PY")
export ENV_PY='
import platform, sys
import torch
print("python", sys.version.split()[0], platform.machine())
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"capability {p.major}.{p.minor}",
          "SMs", p.multi_processor_count)
import ess_train.callbacks, ess_train.ess, ess_train.lit, ess_train.models, ess_train.tasks
print("ess_train (callbacks, ess, lit, models, tasks) imported; it pulled in:",
      {name: name in sys.modules for name in ("hydra", "omegaconf", "wandb", "transformers")})
for name in ("lightning", "triton", "transformers", "pytest", "xdist", "hydra", "omegaconf", "wandb"):
    try:
        print(name, getattr(__import__(name), "__version__", "?"))
    except ImportError as e:
        print(name, "not installed", f"({e})")
'
WORKERS=()
if [ "${TEST_WORKERS:-4}" -gt 1 ] && "$PYTHON" -c "import xdist" 2>/dev/null; then
    WORKERS=(-n "${TEST_WORKERS:-4}")
fi
PYTEST=("$PYTHON" -m pytest -q -p no:cacheprovider -rf --device "$DEVICE" -m device)

echo "gpu_check: DEVICE=$DEVICE QUICK=$QUICK OUT=$OUT PYTHON=$PYTHON ($(date -u +%FT%TZ))"
step env 30 bash -c '{ command -v nvidia-smi >/dev/null && nvidia-smi; } || echo "nvidia-smi: not found"
    "$0" -c "$ENV_PY"' "$PYTHON"
if [ -n "${QUICK_TESTS:-}" ]; then  # rehearsal: collect the whole selection, run two small files
    step tests_collected 120 "${PYTEST[@]}" --co "${DEVICE_TESTS[@]}"
    step tests 300 "${PYTEST[@]}" "${WORKERS[@]}" "${QUICK_TESTS[@]}"
else
    step tests 140 "${PYTEST[@]}" "${WORKERS[@]}" "${DEVICE_TESTS[@]}"
fi
if [ "$QUICK" = 1 ]; then
    step bench_ess 120 "$PYTHON" benchmarks/bench_ess.py --device "$DEVICE" --quick --only-main --no-memory
    step bench_mixers 120 "$PYTHON" benchmarks/bench_mixers.py --device "$DEVICE" --quick --mixers mamba gla
    step bench_callbacks 180 "$PYTHON" benchmarks/bench_callbacks.py --device "$DEVICE" --quick \
        --steps 12 --monitor-every 5 --ab-iters 2
else
    step bench_ess 120 "$PYTHON" benchmarks/bench_ess.py --device "$DEVICE" --only-main --lengths 1024 4096 \
        --channels 64 --obvious-budget 15
    step bench_mixers 60 "$PYTHON" benchmarks/bench_mixers.py --device "$DEVICE" --reps 5 \
        --mixers mamba gla s4d attention
    step bench_callbacks 130 "$PYTHON" benchmarks/bench_callbacks.py --device "$DEVICE" --gpu-model \
        --steps 200 --monitor-every 50 --repeats 1 --ab-iters 20 --ab-mixers mamba attention
fi

{
    echo "gpu_check summary: DEVICE=$DEVICE QUICK=$QUICK, $((SECONDS - T_START))s in all"
    for i in "${!STEPS[@]}"; do
        printf '  %-16s %s\n' "${STEPS[$i]}" "${RESULTS[$i]}"
    done
    echo "outputs: $OUT/{$(IFS=,; echo "${STEPS[*]}")}.txt"
} | tee "$OUT/summary.txt"
! grep -qE '^  \S+ +(FAIL|TIMEOUT)' "$OUT/summary.txt"
