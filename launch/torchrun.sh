#!/usr/bin/env bash
# Usage: launch/torchrun.sh NPROC script.py [args...]  (one host; NCCL on GPUs, Gloo on CPUs)
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NPROC script.py [args...]}
shift
exec torchrun --standalone --nproc_per_node "$nproc" "$@"
