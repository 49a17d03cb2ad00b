#!/usr/bin/env bash
# Multi-node training with torchrun's static rendezvous: run this script once on every node, with the same
# MASTER_ADDR / MASTER_PORT / NNODES everywhere and each node's own NODE_RANK (0 on the master node).
#
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 NNODES=2 GPUS_PER_NODE=8 examples/launch/torchrun_multinode.sh \
#       --config examples/configs/tiny.yaml train.output_dir=/shared/runs/tiny
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 NNODES=2 GPUS_PER_NODE=8 examples/launch/torchrun_multinode.sh \
#       --config examples/configs/tiny.yaml train.output_dir=/shared/runs/tiny
#
# Everything after the variables goes to `python -m opdx.train` (a --config and dotted overrides).
# - train.output_dir must be on a filesystem every node sees: rank 0 writes metrics and the demo/tiny model cache,
#   every rank writes its part of the DeepSpeed checkpoints, and resume (train.resume=true) reads them back.
# - The same command on one machine with MASTER_ADDR=127.0.0.1 and GPUS_PER_NODE=1 (started twice, NODE_RANK=0
#   and 1) simulates 2 nodes on CPU with gloo: tests/test_multinode.py runs exactly that and checks the metrics,
#   checkpoints and resume against a 1-node 2-rank run (see docs/scaling.md).
# - Teacher servers are separate processes (`vllm serve` on their own GPUs or nodes): point every rank at them with
#   teacher.server_urls=[http://HOST1:8000,http://HOST2:8000] (docs/scaling.md#teacher-server-pool).
set -euo pipefail

: "${NODE_RANK:?set NODE_RANK (0 .. NNODES-1) for this node}"
: "${MASTER_ADDR:?set MASTER_ADDR (address of the NODE_RANK=0 node, reachable from every node)}"
MASTER_PORT="${MASTER_PORT:-29500}"
NNODES="${NNODES:-2}"
GPUS_PER_NODE="${GPUS_PER_NODE:-1}"   # training ranks per node (one per GPU; on CPU, 1-2 with OMP_NUM_THREADS=1)

# CPU: one thread per rank keeps the ranks from fighting over cores
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

exec torchrun \
    --nnodes "$NNODES" --nproc_per_node "$GPUS_PER_NODE" --node_rank "$NODE_RANK" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m opdx.train "$@"
