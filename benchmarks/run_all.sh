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

# toy/digits/overhead predate the LoRA 3x default: their 'disback' runs recorded LoRA nodes at 1x (a rerun
# of these commands now records at 3x; add degradation_lr_scale=1 to a LoRA variant to reproduce them).
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

regimes() {  # issue 11: where DisBack helps (docs/WHEN_DISBACK_HELPS.md); 600 iterations, DMD2
  # The paper's path (LoRA nodes recorded at the training lr) is named with degradation_lr_scale=1 here:
  # 'disback' itself now records LoRA nodes at 3x (the default these runs chose).
  local C="--adapter dmd2 --seeds 0 1 2 --threads 1 --no-progress --resume" RR=$R/regimes
  local V="base disback:degradation_lr_scale=1 disback:node_mode=full disback:degradation_lr_scale=3 disback:schedule=linear,degradation_lr_scale=1 \
    disback:schedule=budget,share=0.3,degradation_lr_scale=1 disback:schedule=warm_start,degradation_lr_scale=1"
  $BIN/disback bench --problem toy2d $C --variants $V --out $RR/toy2d
  $BIN/disback bench --problem toy2d-edm $C --variants $V --out $RR/toy2d-edm
  $BIN/disback bench --problem grid25 $C --variants $V --out $RR/grid25
  $BIN/disback bench --problem toy2d --student fresh $C --variants $V --out $RR/toy2d-fresh
  $BIN/disback bench --problem toy2d --student small $C --variants $V --out $RR/toy2d-small
  $BIN/disback bench --problem toy2d --critic-steps 1 $C --variants $V --out $RR/toy2d-critic1
  $BIN/disback bench --problem toy2d --fake-lr-scale 0.1 $C --variants $V --out $RR/toy2d-slowcritic
  $BIN/disback bench --problem toy2d --critic-steps 2 $C --variants base disback:degradation_lr_scale=1 disback:degradation_lr_scale=3 \
    --out $RR/toy2d-critic2
  $BIN/disback bench --problem toy2d --fake-lr-scale 0.5 $C --variants base disback:degradation_lr_scale=1 disback:degradation_lr_scale=3 \
    --out $RR/toy2d-slowcritic0.5
  $BIN/disback bench --problem toy2d --fake-lr-scale 0.3 $C --variants $V disback:degradation_steps=200,degradation_lr_scale=1 \
    disback:degradation_steps=200,degradation_lr_scale=2.5 --out $RR/toy2d-slowcritic0.3
  $BIN/disback bench --problem toy2d --init-generator $RR/toy2d/generator-base-seed0.safetensors $C \
    --variants base disback:degradation_lr_scale=3 --out $RR/toy2d-distilled
  # 5 seeds for base, the paper's path (LoRA at 1x) and the default (LoRA at 3x), from a copy of the 3-seed results
  for spec in "toy2d:--problem toy2d" "toy2d-edm:--problem toy2d-edm" "grid25:--problem grid25" \
      "toy2d-fresh:--problem toy2d --student fresh" "toy2d-small:--problem toy2d --student small" \
      "toy2d-critic1:--problem toy2d --critic-steps 1" "toy2d-slowcritic0.3:--problem toy2d --fake-lr-scale 0.3" \
      "toy2d-slowcritic:--problem toy2d --fake-lr-scale 0.1"; do
    local name=${spec%%:*} flags=${spec#*:}
    mkdir -p $RR/5seeds/$name
    [ -f $RR/5seeds/$name/results.json ] || cp $RR/$name/results.json $RR/5seeds/$name/results.json
    $BIN/disback bench $flags --adapter dmd2 --seeds 0 1 2 3 4 --threads 1 --no-progress --resume \
      --variants base disback:degradation_lr_scale=1 disback:degradation_lr_scale=3 --out $RR/5seeds/$name
  done
  local PS="python benchmarks/path_shape.py --seeds 0 1"
  $BIN/$PS --problem toy2d --out $R/path_shape-toy2d.json --variants disback:degradation_lr_scale=1 disback:rank=32,degradation_lr_scale=1 disback:node_mode=svd \
    disback:node_mode=full disback:degradation_lr_scale=2 disback:degradation_lr_scale=3 disback:degradation_lr_scale=5 \
    disback:degradation_lr_scale=10
  $BIN/$PS --problem toy2d --student fresh --out $R/path_shape-toy2d-fresh.json \
    --variants disback:degradation_lr_scale=1 disback:node_mode=full disback:degradation_lr_scale=3
  $BIN/$PS --problem toy2d-edm --out $R/path_shape-toy2d-edm.json \
    --variants disback:degradation_lr_scale=1 disback:node_mode=full disback:degradation_lr_scale=3
  $BIN/python benchmarks/regimes.py
}

images() {  # issue 20: the critic-lag regimes on images; base vs the default DisBack (LoRA nodes at 3x), 600 iterations
  local C="--seeds 0 1 2 --threads 1 --no-progress --resume --variants base disback" RI=$R/image-regimes
  $BIN/disback bench --problem digits --adapter dmd2 --critic-steps 1 $C --out $RI/digits-dmd2-critic1
  $BIN/disback bench --problem digits --adapter dmd2 --fake-lr-scale 0.3 $C --out $RI/digits-dmd2-slowcritic0.3
  $BIN/disback bench --problem digits --adapter di $C --out $RI/digits-di
  $BIN/disback bench --problem digits --adapter sid $C --out $RI/digits-sid
  # SiD: the paper's 1x path and the fake-score warm start alone (fake from node N, target the teacher)
  $BIN/disback bench --problem digits --adapter sid --seeds 0 1 2 --threads 1 --no-progress --resume \
    --variants base disback disback:degradation_lr_scale=1 disback:schedule=warm_start --out $RI/digits-sid
  # SiD: the path's targets without the warm start (the fake score starts from the teacher, as the base's)
  $BIN/disback bench --problem digits --adapter sid --seeds 0 1 2 --threads 1 --no-progress --resume \
    --variants base disback:fake_start=teacher --out $RI/digits-sid
  $BIN/disback bench --problem digits --adapter dmd2 --student small $C --out $RI/digits-dmd2-small
  $BIN/disback bench --problem digits --adapter dmd2 --init-generator $RI/digits-dmd2-critic1/generator-base-seed0.safetensors \
    --critic-steps 1 $C --out $RI/digits-dmd2-distilled-critic1
  $BIN/disback bench --problem digits-cond --adapter dmd2 --critic-steps 1 $C --out $RI/digits-cond-dmd2-critic1
  $BIN/disback bench --problem digits-cond --adapter dmd2 --fake-lr-scale 0.3 $C --out $RI/digits-cond-dmd2-slowcritic0.3
  $BIN/disback bench --problem digits-cond --adapter di $C --out $RI/digits-cond-di
  $BIN/disback bench --problem digits-cond --adapter sid --seeds 0 1 2 --threads 1 --no-progress --resume \
    --variants base disback disback:fake_start=teacher --out $RI/digits-cond-sid
}

images5() {  # issue 20: seeds 3 and 4 added to five image regimes (each command resumes the 3-seed folder)
  local S="--seeds 0 1 2 3 4 --threads 1 --no-progress --resume" RI=$R/image-regimes
  $BIN/disback bench --problem digits --adapter di $S --variants base disback --out $RI/digits-di
  $BIN/disback bench --problem digits --adapter sid $S --variants base disback disback:fake_start=teacher --out $RI/digits-sid
  $BIN/disback bench --problem digits-cond --adapter dmd2 --critic-steps 1 $S --variants base disback --out $RI/digits-cond-dmd2-critic1
  $BIN/disback bench --problem digits --adapter dmd2 --critic-steps 1 $S --variants base disback --out $RI/digits-dmd2-critic1
}

patches() {  # issue 20 item 3: 16x16 RGB patches of scikit-learn's photographs (disback_core/bench/patches.py), 300 iterations
  local C="--problem patches --adapter dmd2 --seeds 0 1 2 --threads 1 --no-progress --resume --variants base disback --iterations 300" RP=$R/patches
  $BIN/disback bench $C --critic-steps 1 --out $RP/dmd2-critic1
  $BIN/disback bench $C --out $RP/dmd2
}

diagnostic() {  # issue 20: base logs for the regimes run before the logs existed, then the leave-one-out table
  local C="--adapter dmd2 --seeds 0 1 2 --threads 1 --no-progress --resume --no-save-weights --variants base" RD=$R/diagnostic
  $BIN/disback bench --problem grid25 $C --out $RD/grid25
  $BIN/disback bench --problem toy2d-edm $C --out $RD/toy2d-edm
  $BIN/disback bench --problem toy2d --student fresh $C --out $RD/toy2d-fresh
  $BIN/disback bench --problem toy2d --student small $C --out $RD/toy2d-small
  $BIN/disback bench --problem toy2d --fake-lr-scale 0.1 $C --out $RD/toy2d-slowcritic
  $BIN/python benchmarks/diagnostic.py
}

flow() {  # issue item 8: digits-flow, a rectified-flow SD3 transformer teacher (disback_core/bench/digits_flow.py)
  local C="--problem digits-flow --seeds 0 1 2 --threads 1 --no-progress --resume --variants base disback --eval-every 25" RF=$R/digits-flow
  $BIN/disback bench $C --adapter dmd2 --iterations 400 --out $RF/dmd2
  $BIN/disback bench $C --adapter sid --iterations 800 --out $RF/sid
  $BIN/disback bench $C --adapter dmd2 --critic-steps 1 --iterations 400 --out $RF/dmd2-critic1
}

case "${1:-all}" in
  toy) toy ;;
  digits) digits ;;
  digits-ablations) digits_ablations ;;
  overhead) overhead ;;
  regimes) regimes ;;
  images) images ;;
  images5) images5 ;;
  patches) patches ;;
  flow) flow ;;
  diagnostic) diagnostic ;;
  all) toy & digits & wait; overhead ;;
esac
