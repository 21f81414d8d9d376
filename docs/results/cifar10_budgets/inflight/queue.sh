#!/bin/bash
# Usage: queue.sh QUEUE_FILE ; lines NAME|ARGS. Trains (resumes) each run from /work/exp,
# then measures flatness and the train/ pass; marks /work/runs/done/NAME.
set -u
common="--model=wrn-16-1 --validation_examples=5000 --data_dir=/work/shared/data/cifar10 --log_dir=/work/runs/cifar10_100"
while IFS='|' read -r name args; do
  [ -z "$name" ] && continue
  [ -e /work/runs/done/$name ] && continue
  log=/work/runs/logs/$name.log
  echo "$(date -u +%FT%TZ) start $name" >> /work/runs/started
  (cd /work/exp && ./bazelw run //launch:cifar10 -- $args $common) >> $log 2>&1 || { echo "train failed $name" >> $log; continue; }
  run=/work/runs/cifar10_100/$name
  out=/work/runs/measures100/$name
  mkdir -p $out
  (cd /work/exp && ./bazelw run //launch:landscape -- --run_dir=$run --output_dir=$out/flatness \
      --measures=eigenvalues,trace,sharpness,adaptive_sharpness,pac_bayes) >> $log 2>&1 || { echo "flatness failed $name" >> $log; continue; }
  (cd /work/exp && ./bazelw run //launch:landscape -- --run_dir=$run --output_dir=$out/train \
      --batches=0 --measures=) >> $log 2>&1 || { echo "train pass failed $name" >> $log; continue; }
  cp $run/config.json $run/summary.json $out/
  touch /work/runs/done/$name
done < "$1"
