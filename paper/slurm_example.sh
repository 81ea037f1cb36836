#!/bin/bash
# One paper preset distilled and evaluated on several SLURM nodes (an example to adapt: partition, account, paths).
#
#   1. Where there is network (login node), fill the shared caches and export the run's config:
#        export SIDLIB_CACHE=/shared/cache/sidlib TORCH_HOME=/shared/cache/torch
#        python -m experiments.paper fetch-all cifar10-uncond          # teacher, references, Inception weights
#        dvc repro paper/dvc.yaml:teacher@cifar10-uncond paper/dvc.yaml:refs@cifar10-uncond   # after selecting it
#   2. sbatch paper/slurm_example.sh cifar10-uncond
#   3. Record the results in paper/dvc.lock without re-running: dvc commit paper/dvc.yaml:distill@cifar10-uncond
#      paper/dvc.yaml:eval@cifar10-uncond (a single node can instead run `dvc exp run paper/dvc.yaml ...` directly,
#      with TORCHRUN_ARGS unset).
#
# torchrun starts one process per GPU on every node (--nproc_per_node gpu) and the nodes meet through the c10d
# rendezvous on the first node; training resumes from runs/paper/NAME/training-state.pt if the job is requeued.
#SBATCH --job-name=sid-paper
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

NAME=${1:-cifar10-uncond}
RUN=runs/paper/$NAME
cd "${SLURM_SUBMIT_DIR:-.}"
export SIDLIB_CACHE=${SIDLIB_CACHE:-/shared/cache/sidlib} TORCH_HOME=${TORCH_HOME:-/shared/cache/torch}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)  # sed reads everything: head would end the pipe early (SIGPIPE under pipefail)
export TORCHRUN_ARGS="--nnodes $SLURM_NNODES --nproc_per_node gpu --rdzv_id $SLURM_JOB_ID --rdzv_backend c10d --rdzv_endpoint $HEAD_NODE:29500"

# The config, exactly as the pipeline's distill stage writes it (python -m experiments.paper distill-config).
mkdir -p "$RUN" reports/paper/metrics
python -m experiments.paper distill-config "$NAME" --out "$RUN/config.yaml" \
    --set teacher="data/paper/teachers/$NAME.pkl" --set eval_fn=sidlib.metrics.protocol:proxy_fid \
    --set "eval_kwargs={reference_stats: data/paper/refs/$NAME/fid.npz, num_images: 10000, seed_start: 1000000000}"

# One task per node; each task's torchrun starts the node's processes.
srun --kill-on-bad-exit=1 bash -c "torchrun $TORCHRUN_ARGS -m sidlib.distill --config $RUN/config.yaml --run-dir $RUN"
srun --kill-on-bad-exit=1 bash -c "torchrun $TORCHRUN_ARGS -m experiments.paper calc $NAME --network $RUN \
    --refs data/paper/refs/$NAME --out reports/paper/metrics/$NAME.json"
