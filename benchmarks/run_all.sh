#!/usr/bin/env bash
# Every committed benchmark, by the exact commands that made it. Two streams run side by side,
# each single-threaded (times compare on CPU seconds; see disback_core/bench/runner.py).
#   bash benchmarks/run_all.sh            # both streams, ~3 h on 2 CPU cores
#   bash benchmarks/run_all.sh toy        # one stream
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
R=benchmarks/results
COMMON="--seeds 0 1 2 --threads 1 --no-progress"

toy() {
  for a in dmd2 di sid; do  # seeds 0-2 were first run together, seeds 3-7 added with --resume
    $BIN/disback bench --problem toy2d --adapter $a --seeds 0 1 2 3 4 5 6 7 --threads 1 --no-progress --iterations 1500 \
      --eval-every 50 --variants base disback --out $R/toy2d-adapters/$a
  done
  $BIN/disback bench --problem toy2d --adapter dmd2 $COMMON --iterations 1500 --eval-every 50 --out $R/toy2d-ablations --variants base disback \
    disback:nodes=3 disback:nodes=10 disback:share=0.05 disback:share=0.3 disback:rank=2 disback:rank=32 \
    disback:degradation_steps=2000 disback:schedule=adaptive disback:schedule=warm_start \
    disback:node_mode=svd disback:node_mode=full
  $BIN/python benchmarks/storage.py --out $R/storage.json
}

digits() {
  $BIN/disback bench --problem digits --adapter dmd2 di sid $COMMON --variants base disback --out $R/digits-adapters
  for a in dmd2 di sid; do  # two more seeds per adapter
    $BIN/disback bench --problem digits --adapter $a --seeds 0 1 2 3 4 --threads 1 --no-progress --variants base disback \
      --out $R/digits-adapters/$a --resume
  done
  $BIN/disback bench --problem digits-cond --adapter dmd2 $COMMON --variants base disback --out $R/digits-cond-dmd2
  digits_ablations
}

overhead() {
  $BIN/python benchmarks/overhead.py --out $R/overhead.json
  $BIN/python benchmarks/switch_latency.py --configs tiny sd15 --dtypes float32 bfloat16 --out $R/switch_latency.json
}

digits_ablations() {
  $BIN/disback bench --problem digits --adapter dmd2 $COMMON --out $R/digits-ablations --variants base disback \
    disback:schedule=warm_start disback:node_mode=svd disback:node_mode=full
}

case "${1:-all}" in
  toy) toy ;;
  digits) digits ;;
  digits-ablations) digits_ablations ;;
  overhead) overhead ;;
  all) toy & digits & wait; overhead ;;
esac
