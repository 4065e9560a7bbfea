#!/bin/bash
# Multi-node training with Slurm + torchrun: one torchrun per node, each starting one process per GPU.
#
#   sbatch examples/slurm.sh configs/openflamingo-9b.toml --train.output_dir /shared/runs/of9b
#
# Every argument after the recipe is a config override (--section.key value). The output directory must be on a
# filesystem all nodes share: every rank writes its own shards of each checkpoint there (torch.distributed.checkpoint),
# and a requeued or resubmitted job resumes from the newest complete checkpoint automatically (checkpoint.resume =
# "auto"). A job killed while saving leaves only a hidden .tmp-step_* directory, which resume ignores.
#
#SBATCH --job-name=openflamingo
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1          # one torchrun launcher per node
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=48:00:00
#SBATCH --requeue                    # preemption: the requeued job resumes from the latest checkpoint
#SBATCH --output=%x-%j.out

set -euo pipefail
CONFIG=${1:?usage: sbatch examples/slurm.sh CONFIG.toml [--section.key value ...]}
shift

GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-8}
# The first node of the allocation hosts the rendezvous (c10d backend: no separate etcd needed).
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}   # per process; data-loader workers bring their own
export HF_HUB_OFFLINE=1                         # backbones come from local directories named in the recipe
# export NCCL_DEBUG=WARN NCCL_SOCKET_IFNAME=ib0  # cluster-specific network settings go here

srun --kill-on-bad-exit=1 python -m torch.distributed.run \
    --nnodes "$SLURM_JOB_NUM_NODES" \
    --nproc_per_node "$GPUS_PER_NODE" \
    --rdzv_id "$SLURM_JOB_ID" \
    --rdzv_backend c10d \
    --rdzv_endpoint "$MASTER_ADDR:$MASTER_PORT" \
    -m openflamingo.train --config "$CONFIG" "$@"
