#!/usr/bin/env bash
# `make demo`: the main job on Fashion-MNIST. Usage: bench/demo.sh STORE
set -euo pipefail
STORE=${1:-nsd-store}
NSD=".venv/bin/nsd --store $STORE"
$NSD init
$NSD ingest fashion-mnist --labeled-per-class 100 --seed 0
$NSD versions
$NSD show images
