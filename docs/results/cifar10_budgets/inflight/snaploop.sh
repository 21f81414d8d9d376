#!/bin/bash
while true; do sleep 2100; /work/runs/snapshot.sh >> /work/runs/snapshot.log 2>&1; done
