#!/bin/bash
# Copies each unfinished 100-epoch run's newest checkpoint, events and config into the repo
# (docs/results/cifar10_budgets/inflight/RUN) with the trainer paused, and commits only those paths.
set -u
repo=/work/main
dest=$repo/docs/results/cifar10_budgets/inflight
for run in /work/runs/cifar10_100/*/; do
  name=$(basename $run)
  [ -e /work/runs/done/$name ] && { rm -rf $dest/$name; continue; }
  [ -e $run/checkpoints/checkpoint ] || continue
  pid=$(sed -n 's/^pid \([0-9]*\) .*/\1/p' $run/.lock 2>/dev/null)
  alive=0; [ -n "$pid" ] && kill -0 $pid 2>/dev/null && alive=1
  [ $alive = 1 ] && kill -STOP $pid
  ckpt=$(sed -n 's/^model_checkpoint_path: "\(.*\)"/\1/p' $run/checkpoints/checkpoint)
  rm -rf $dest/$name.tmp; mkdir -p $dest/$name.tmp/checkpoints
  cp $run/config.json $run/events.out.tfevents.* $dest/$name.tmp/
  cp $run/checkpoints/$ckpt.* $dest/$name.tmp/checkpoints/
  printf 'model_checkpoint_path: "%s"\nall_model_checkpoint_paths: "%s"\n' $ckpt $ckpt > $dest/$name.tmp/checkpoints/checkpoint
  # pause.sh STOP leaves /work/runs/paused: a snapshot must not wake a paused trainer.
  [ $alive = 1 ] && [ ! -e /work/runs/paused ] && kill -CONT $pid
  rm -rf $dest/$name; mv $dest/$name.tmp $dest/$name
  echo "$name at $ckpt"
done
cd $repo
for i in 1 2 3 4 5 6; do
  [ -e .git/index.lock ] || [ -d .git/rebase-merge ] || [ -d .git/rebase-apply ] || break
  sleep 20
done
git add -A docs/results/cifar10_budgets/inflight
git commit -q -m "issue 20: carry-over checkpoints of the in-flight 100-epoch runs ($(date -u +%FT%TZ))" -- docs/results/cifar10_budgets/inflight && git log --oneline -1
