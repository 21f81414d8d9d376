#!/bin/bash
# Usage: pause.sh STOP|CONT. Pauses or resumes every live trainer (pids from
# the run locks), e.g. while the test suite is timed; snapshot.sh leaves
# paused trainers paused.
case "$1" in STOP) touch /work/runs/paused ;; CONT) rm -f /work/runs/paused ;; *) echo "usage: pause.sh STOP|CONT" >&2; exit 2 ;; esac
for lock in /work/runs/cifar10_100/*/.lock; do
  pid=$(sed -n 's/^pid \([0-9]*\) .*/\1/p' $lock 2>/dev/null)
  [ -n "$pid" ] && kill -0 $pid 2>/dev/null && kill -$1 $pid && echo "$1 $pid $(dirname $lock)"
done
