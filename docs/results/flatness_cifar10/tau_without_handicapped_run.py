"""Kendall tau of each measure with the gap over flatness.csv, with and
without the 20-epoch Entropy-SGD seed-0 run, whose gap uses its handicapped
logged validation error (un-augmented BatchNorm recalibration).

    PYTHONPATH=. .venv/bin/python docs/results/flatness_cifar10/tau_without_handicapped_run.py
"""
import csv
import os

from entropy_sgd.reports import flatness_report

HERE = os.path.dirname(os.path.abspath(__file__))
rows = list(csv.DictReader(open(os.path.join(HERE, "flatness.csv"))))
handicapped = [r for r in rows if r["budget"] == "20" and r["seed"] == "0"
               and r["optimizer"].startswith("entropy_sgd")]
for name, runs in (("all runs", rows),
                   ("without 20-epoch Entropy-SGD seed 0",
                    [r for r in rows if r not in handicapped])):
  gaps = [float(r["gap"]) for r in runs]
  print(f"{name} ({len(runs)}):")
  for measure, _, _ in flatness_report.MEASURES:
    values = [float(r[measure]) for r in runs]
    low, high = flatness_report.bootstrap_interval(values, gaps)
    print(f"  {measure}: tau {flatness_report.kendall_tau(values, gaps):.2f} "
          f"[{low:.2f}, {high:.2f}]")
