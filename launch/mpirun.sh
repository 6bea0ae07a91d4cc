#!/usr/bin/env bash
# Usage: launch/mpirun.sh NP HOSTFILE script.py [args...]
# mpirun starts the ranks; --backend gloo|nccl rendezvous through mpi4py (no MASTER_ADDR needed),
# --backend mpi sends the collectives themselves through MPI.
# Multi-host: set the interface the ranks talk over, e.g. GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0.
set -euo pipefail
np=${1:?usage: launch/mpirun.sh NP HOSTFILE script.py [args...]}
hostfile=${2:?usage: launch/mpirun.sh NP HOSTFILE script.py [args...]}
shift 2
root=()
[ "$(id -u)" = 0 ] && root=(--allow-run-as-root)
exec mpirun "${root[@]}" -np "$np" --hostfile "$hostfile" --map-by ppr:1:slot \
    -x PATH -x LD_LIBRARY_PATH -x GLOO_SOCKET_IFNAME -x NCCL_SOCKET_IFNAME -x MASTER_ADDR -x MASTER_PORT \
    -x LLAMA_DIST_TIMEOUT -x LLAMA_DIST_HEARTBEAT_TIMEOUT \
    python "$@"
