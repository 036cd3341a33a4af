#!/bin/bash
# The commands behind benchmarks/results/gdd-digits (each ran as its own background process, one
# torch thread, side by side with other benchmarks on a shared 2-core machine). --resume reuses
# finished runs, so an interrupted command can be repeated as is.
cd "$(dirname "$0")/../../.." || exit 1
export OMP_NUM_THREADS=1
R=benchmarks/results/gdd-digits
case "$1" in
  gdd)       .venv/bin/disback bench --problem digits --adapter gdd --variants base --seeds 0 1 2 --iterations 1800 --eval-every 100 --lr 1e-4 --threads 1 --no-progress --resume --out $R/gdd ;;
  gdd-i)     .venv/bin/disback bench --problem digits --adapter gdd --variants base --seeds 0 1 2 --iterations 900 --eval-every 100 --lr 1e-4 --freeze gddi --threads 1 --no-progress --resume --out $R/gdd-i ;;
  dmd2)      .venv/bin/disback bench --problem digits --adapter dmd2 --variants base --seeds 0 1 2 --threads 1 --no-progress --resume --out $R/dmd2 ;;
  dmd2-gddi) .venv/bin/disback bench --problem digits --adapter dmd2 --variants base --seeds 0 1 2 --freeze gddi --threads 1 --no-progress --resume --out $R/dmd2-gddi ;;
  *) echo "usage: $0 gdd|gdd-i|dmd2|dmd2-gddi"; exit 2 ;;
esac
