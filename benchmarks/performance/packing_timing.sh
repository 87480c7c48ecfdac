#!/usr/bin/env bash
# Issue #35's timings of packed batches, in one go; run it alone on the machine (~45 min here):
#   1. selftune's default (packed) against the run_glue-style peer (peer_timing.py's protocol:
#      1,000 examples, one epoch, medians of 3 alternating repeats) on the five GLUE tasks;
#   2. packed against padded random batches, baseline and sda, on STS-B and SST-2 (step times);
#   3. where a packed step's time goes on RTE for every strategy, and the padded baseline and sda.
# Outputs: benchmarks/performance/{peer_timing_packed,profile_*_{packed,padded}}.txt; progress and
# the runs' own logs go to runs/packing_timing.log.
#   benchmarks/performance/packing_timing.sh [DATA_DIR]     # default ../shared/data
set -euo pipefail
cd "$(dirname "$0")/../.."
python -c "import selftune" 2>/dev/null \
  || { echo "packing_timing.sh: activate the venv with selftune first" >&2; exit 2; }
data="${1:-../shared/data}"
out=benchmarks/performance
log=runs/packing_timing.log
mkdir -p runs
export HF_HUB_OFFLINE=1
stamp() { date -u +"$1 %FT%TZ" >> "$log"; }
stamp start
python benchmarks/peer_timing.py --tasks rte,mrpc,stsb,cola,sst2 --data-dir "$data" \
    --max-train-samples 1000 --epochs 1 --repeats 3 --work-dir runs/peer_timing_packed \
    > "$out/peer_timing_packed.txt" 2>> "$log"
stamp "peer done"
for task in stsb sst2; do
  python benchmarks/profile_step.py --task "$task" --data-dir "$data" --strategies baseline,sda \
      --max-train-samples 1000 > "$out/profile_${task}_packed.txt" 2>> "$log"
  python benchmarks/profile_step.py --task "$task" --data-dir "$data" --strategies baseline,sda \
      --max-train-samples 1000 --no-packing > "$out/profile_${task}_padded.txt" 2>> "$log"
done
stamp "stsb, sst2 done"
python benchmarks/profile_step.py --task rte --data-dir "$data" \
    --strategies baseline,se,sda,sdv,ema --max-train-samples 512 \
    > "$out/profile_rte_packed.txt" 2>> "$log"
python benchmarks/profile_step.py --task rte --data-dir "$data" --strategies baseline,sda \
    --max-train-samples 512 --no-packing > "$out/profile_rte_padded.txt" 2>> "$log"
stamp end
