# Shared body of pretrain.sbatch and finetune.sbatch (sourced; ENTRY names the launch script).
#
# One task per GPU via srun: every task is a rank that reads SLURM_PROCID/SLURM_NTASKS/
# SLURM_LOCALID (megascale/train/dist.py), so no ssh and no second launcher is needed.
# The rendezvous host is the first node of the allocation; the port derives from the
# job id, so a requeued job (same id) finds the same run directory and resumes from it.
# Exit code 3 means "stopped on SIGTERM/SIGUSR1 with a checkpoint saved": requeue.

set -uo pipefail
cd "${SLURM_SUBMIT_DIR:-$(pwd)}" || exit 1
CONFIG=${1:?"usage: sbatch $ENTRY_SCRIPT CONFIG [key.sub=value ...] (submit from the repository root)"}
shift
PYTHON=${PYTHON:-.venv/bin/python}
RUN_DIR=${RUN_DIR:-runs/${SLURM_JOB_NAME:-megascale}-${SLURM_JOB_ID}}
MASTER_ADDR=${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT
mkdir -p "$RUN_DIR"
echo "megascale: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}: $ENTRY -> $RUN_DIR, rendezvous $MASTER_ADDR:$MASTER_PORT"

# srun in the background so a SIGTERM to this shell (preemption) is noted while the
# ranks, which get it too, finish their step and checkpoint.
srun --kill-on-bad-exit=1 "$PYTHON" "$ENTRY" --config "$CONFIG" "train.out_dir=$RUN_DIR" train.resume=auto "$@" &
SRUN_PID=$!
trap 'echo "megascale: SIGTERM: waiting for the ranks to checkpoint"' TERM
wait "$SRUN_PID"
rc=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do  # wait returned early for the trap: wait again
    wait "$SRUN_PID"
    rc=$?
done
if [ "$rc" -eq 3 ]; then
    echo "megascale: stopped with a checkpoint in $RUN_DIR; requeueing job $SLURM_JOB_ID"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$rc"
