#!/usr/bin/env bash
# The follow-ups of the registered tests the table cannot decide (experiments/prereg/followup.json, written
# by followup.py --plan), run on one GPU in bounded, resumable calls of the device tool.
#
# Prepare here (the device has torch, Lightning and numpy, but not Hydra, and no network):
#
#   PYTHONPATH=. .venv/bin/python experiments/prereg/followup.py --plan
#   .venv/bin/pip install -q --target .gpu-deps --no-deps hydra-core==1.3.8 omegaconf==2.3.1 \
#       antlr4-python3-runtime==4.9.3
#
# The device call (about 2 MiB carried; each call trains for TIME_LIMIT seconds, then packs what is done):
#
#   run(command="bash experiments/prereg/followup_gpu.sh", carry=[".gpu-deps"], timeout_s=590)
#
# It comes back as $OUT/followup_results.tar.gz (runs.csv, runs_curves.csv; no run directories) and
# $OUT/followup.log. To resume, unpack it into experiments/prereg/followup_results here and carry that folder
# too: runs already in its runs.csv are skipped. Analyse with
#
#   PYTHONPATH=. .venv/bin/python experiments/prereg/followup.py --analyse experiments/prereg/followup_results
#
# Each run is the registered design's (float32: trainer=gpu with trainer.precision=32-true) on the follow-up
# seeds. Rehearsal on a CPU (two runs per design, a few steps each, the CPU trainer):
#
#   DEVICE=cpu bash experiments/prereg/followup_gpu.sh
#
# Variables: DEVICE (cuda), WORKERS (8 on cuda, 2 on cpu), TIME_LIMIT (520 s of training), OUT (./gpu_out),
# PYTHON (./.venv/bin/python where it exists, else python3).

set -u -o pipefail
cd "$(dirname "$0")/../.."

DEVICE=${DEVICE:-cuda}
OUT=${OUT:-./gpu_out}
TIME_LIMIT=${TIME_LIMIT:-520}
RESULTS=experiments/prereg/followup_results
PLAN=experiments/prereg/followup.json
mkdir -p "$OUT" "$RESULTS"
if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD:$PWD/.gpu-deps${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 ESS_THREADS=1
LOG="$OUT/followup.log"

if [ "$DEVICE" = cpu ]; then
    WORKERS=${WORKERS:-2}
    EXTRA=(--smoke)
    CSV=runs_smoke.csv
else
    WORKERS=${WORKERS:-8}
    EXTRA=(--override trainer=gpu trainer.precision=32-true)
    CSV=runs.csv
    nvidia-smi --query-gpu=name,memory.total --format=csv,noheader >>"$LOG" 2>&1
fi
if [ ! -f "$PLAN" ]; then
    echo "no $PLAN: run experiments/prereg/followup.py --plan first" | tee -a "$LOG"
    exit 1
fi
# (design 2-4's regime comes from design 1's pilot: run.py reads it from the committed runs)

mapfile -t JOBS < <("$PYTHON" -c "
import json, sys
from experiments.prereg.followup import FIRST_SEED
for p in sorted(json.load(open('$PLAN')), key=lambda p: p['runs']):  # the cheapest first
    print(p['design'], f\"{FIRST_SEED}-{FIRST_SEED + p['seeds'] - 1}\", p.get('doses', 0))
")
START=$SECONDS
STATUS=0
for job in "${JOBS[@]}"; do
    read -r design seeds doses <<<"$job"
    DOSES=()
    [ "${doses:-0}" -gt 0 ] && DOSES=(--doses "$doses")
    left=$((TIME_LIMIT - (SECONDS - START)))
    if [ "$left" -le 30 ]; then
        echo "design $design: no time left in this call; the next call resumes it" | tee -a "$LOG"
        continue
    fi
    echo "design $design, seeds $seeds, $WORKERS workers, at most $left s" | tee -a "$LOG"
    timeout --kill-after=20 "$left" "$PYTHON" experiments/prereg/run.py --design "$design" --seeds "$seeds" "${DOSES[@]}" \
        --workers "$WORKERS" --out "$RESULTS" "${EXTRA[@]}" >>"$LOG" 2>&1
    rc=$?
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
        echo "design $design: stopped at the time limit (runs done so far are kept)" | tee -a "$LOG"
    elif [ "$rc" != 0 ]; then
        echo "design $design: run.py exited $rc" | tee -a "$LOG"
        STATUS=1
    fi
done
# the curves of the runs finished so far (run.py writes them only when it ends on its own)
"$PYTHON" -c "
from pathlib import Path
from experiments.common import read_rows
from experiments.prereg.followup import FIRST_SEED
from experiments.prereg.run import write_curves
write_curves(Path('$RESULTS'), Path('$RESULTS') / '$CSV')
rows = [r for r in read_rows(Path('$RESULTS') / '$CSV') if int(r['run_id'].rsplit('_s', 1)[1]) >= FIRST_SEED]
print(f'followup: {sum(not r.get(\"error\") for r in rows)} runs done, {sum(bool(r.get(\"error\")) for r in rows)} failed')
" 2>&1 | tee -a "$LOG" || STATUS=1
tar -czf "$OUT/followup_results.tar.gz" -C "$RESULTS" --exclude runs .
echo "followup: $((SECONDS - START)) s; packed into $OUT/followup_results.tar.gz" | tee -a "$LOG"
exit $STATUS
