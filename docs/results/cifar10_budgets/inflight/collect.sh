#!/bin/bash
# Copies each finished 100-epoch run (done/NAME) into the repo: run summary and events
# under docs/results/cifar10_budgets/runs/100/NAME, measures under
# docs/results/flatness_cifar10/measures/100/NAME.
set -eu
repo=${1:-/work/main}
for marker in /work/runs/done/*; do
  name=$(basename $marker)
  run=/work/runs/cifar10_100/$name
  [ -d $run ] || continue
  dest=$repo/docs/results/cifar10_budgets/runs/100/$name
  mkdir -p $dest
  cp $run/config.json $run/summary.json $run/events.out.tfevents.* $dest/
  mdest=$repo/docs/results/flatness_cifar10/measures/100/$name
  mkdir -p $mdest
  cp -r /work/runs/measures100/$name/. $mdest/
  rm -rf $repo/docs/results/cifar10_budgets/inflight/$name
  echo "collected $name"
done
