#!/usr/bin/env bash
# `make demo`: Noisy Student on Fashion-MNIST with 1,000 labels, end to end, on a CPU.
# Usage: bench/demo.sh [STORE]. Re-running it resumes the loop (or just prints its table).
set -euo pipefail
STORE=${1:-nsd-store}
NSD=".venv/bin/nsd --store $STORE"
[ -e "$STORE/catalog.sqlite" ] || $NSD init
# 100 labeled images per class; the other 59,000 training images become the unlabeled pool
# (their labels hidden in gold_label, to score the pseudo labels); 10,000 test images.
$NSD ingest fashion-mnist --labeled-per-class 100 --seed 0
$NSD show images
# Teacher and students are test_resnet (0.37M parameters): the paper's students are equal to
# or larger than their teacher; equal keeps the demo within minutes on 2 CPU cores. The loop's
# defaults (README, "Recipe"): a noised teacher of 2,400 steps, then per iteration label (no
# noise) -> balance -> a noised student of 1,200 steps that starts from its teacher's weights.
# --baseline adds the compute-matched yardstick: the same architecture and options on the
# 1,000 labels alone for the loop's total steps (the table's last row).
$NSD loop --name fmnist --models test_resnet --iterations 2 --baseline
$NSD versions --last 10
$NSD lineage fmnist-m2
# The whole run as one offline HTML page: curves, lineage, confidence, flips, selections, images.
$NSD report --loop fmnist -o "$STORE-report.html" --force
