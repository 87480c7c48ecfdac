#!/usr/bin/env bash
# Keep this machine busy with the benchmark grids: two `selftune bench` workers, one thread
# each (1.2x the throughput of one 2-thread worker here, BENCHMARKS.md "Threads"), working
# through the grids in the order given; both share each grid (every run is claimed by one
# worker) and move on to the next grid when nothing is left to claim.
#
#   benchmarks/run_grids.sh                     # the default queue below
#   benchmarks/run_grids.sh benchmarks/cls_norm.yaml benchmarks/bam.yaml
#   benchmarks/run_grids.sh benchmarks/cls_norm.yaml@0-2   # only seeds 0-2 of that grid
#   benchmarks/run_grids.sh benchmarks/sd_tuned.yaml@0-2:baseline,ema   # and only 2 variants
#   WORKERS=1 benchmarks/run_grids.sh ...       # one worker
#   DEADLINE=+2h40m benchmarks/run_grids.sh     # start only runs expected to end by then
#
# DEADLINE (+2h40m, 13:40 or an ISO date-time) is fixed once, here, and passed to every
# `selftune bench --deadline`: a run that would not finish in time (by the recorded runs like
# it) is left for the next session and shorter runs further on are taken instead. Use it when
# the machine may not be kept after the session: a run cut off then is lost, not resumed.
#
# Returns at once; the workers run in the background in their own process group and log to
# $RUNS_ROOT/logs/. Stop them with: kill -- -"$(cat "$RUNS_ROOT/logs/workers.pgid")"
# (a killed run resumes from its last checkpoint on the next start).
#
# Run folders go to runs/ in the checkout. A checkout can be laid anew between sessions while
# the machine is kept, so when runs/ does not exist yet it is made a link to $RUNS_ROOT
# (default ~/selftune-runs), outside the checkout: an interrupted run then resumes in the next
# session instead of starting over. Finished runs are in the results files, committed.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS_ROOT="${RUNS_ROOT:-$HOME/selftune-runs}"
WORKERS="${WORKERS:-2}"
if [ "$#" -gt 0 ]; then
  grids=("$@")
else
  # Issue #32, breadth first (seeds 0-2 of everything, then 3-4), at the learning rates that
  # baseline_lr named (BENCHMARKS.md): first the tuned baselines of the four small tasks (they
  # are also issue #35's accuracy check of packed batches), then SST-2 at full size with every
  # method, then ema on the small tasks and IMDb's baseline and self-ensemble. The variants
  # that take "the best SD setting of (a)" (sd_tuned's and sd_scale_imdb's sda) join once
  # sd_scale_sst2's seeds 0-2 have named it. The grids of issues #4-#7 are complete (their
  # results files); bam_sda, which no issue asks for, is left out.
  grids=(benchmarks/sd_tuned.yaml@0-2:baseline benchmarks/sd_scale_sst2.yaml@0-2
         benchmarks/sd_tuned.yaml@0-2:ema benchmarks/sd_scale_imdb.yaml@0-2:baseline,se)
fi
for entry in "${grids[@]}"; do
  grid="${entry%%:*}"; grid="${grid%@*}"
  [ -f "$grid" ] || { echo "run_grids.sh: no grid file $grid" >&2; exit 2; }
done
command -v selftune >/dev/null || { echo "run_grids.sh: activate the venv with selftune first" >&2; exit 2; }
deadline=""
if [ -n "${DEADLINE:-}" ]; then
  # The Python selftune runs in (the venv's), whichever `python` comes first on PATH.
  deadline=$("$(dirname "$(command -v selftune)")/python" - "$DEADLINE" <<'PY'
import sys
from selftune_experiments.bench import parse_deadline
from selftune.errors import SelftuneError
try:
    print(parse_deadline(sys.argv[1]).isoformat(timespec="minutes"))
except SelftuneError as err:
    sys.exit(f"run_grids.sh: DEADLINE: {err}")
PY
) || exit 2
fi

if [ ! -e runs ]; then
  mkdir -p "$RUNS_ROOT"
  ln -s "$RUNS_ROOT" runs
fi
logs="runs/logs"
mkdir -p "$logs"

export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# setsid: one process group for every worker and the trainings they start, so one kill stops all.
setsid bash -c '
  echo $$ > "$0/workers.pgid"
  deadline=()
  if [ -n "$2" ]; then deadline=(--deadline "$2"); fi
  for i in $(seq 1 "$1"); do
    (for entry in "${@:3}"; do
       # GRID[@SEEDS][:VARIANTS]
       options=()
       case "$entry" in *:*) options+=(--only-variants "${entry##*:}"); entry="${entry%%:*}" ;; esac
       case "$entry" in *@*) options+=(--seeds "${entry##*@}"); entry="${entry%@*}" ;; esac
       selftune bench "$entry" "${options[@]}" "${deadline[@]}"
     done) > "$0/worker$i.log" 2>&1 &
    sleep 5  # the second worker then finds the first run claimed and takes the next
  done
  wait
' "$logs" "$WORKERS" "$deadline" "${grids[@]}" < /dev/null > /dev/null 2>&1 &
sleep 1
echo "started $WORKERS worker(s) on: ${grids[*]}${deadline:+ (deadline $deadline)}"
echo "logs: $logs/worker*.log; stop: kill -- -\$(cat $logs/workers.pgid)"
