#!/usr/bin/env bash
# One SLURM array task per participant, then the group level once all tasks are done:
#
#   export BIDS_DIR=/data/bids OUT_DIR=/data/derivatives/dlf-bids ATLAS_DIR=/data/atlases
#   N=$(find "$BIDS_DIR" -maxdepth 1 -name 'sub-*' -type d | wc -l)
#   jid=$(sbatch --parsable --array=1-"$N" workflows/slurm_array.sh)
#   sbatch --dependency=afterany:"$jid" --wrap "dlf-bids $BIDS_DIR $OUT_DIR group"
#
# Optional: DLF_BIDS_ARGS (more dlf-bids options, e.g. "--dlf-model /models/dlf.pt"),
# WORK_ROOT (default $TMPDIR/dlf-bids-work). sbatch options on the command line override the
# #SBATCH lines below (e.g. --cpus-per-task=8 --mem=16G). Each task gets its own work dir (no
# shared pybids index, no 'database is locked'); --mem-gb follows the memory Slurm granted.
#SBATCH --job-name=dlf-bids
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=04:00:00
set -euo pipefail
: "${BIDS_DIR:?set BIDS_DIR}" "${OUT_DIR:?set OUT_DIR}" "${ATLAS_DIR:?set ATLAS_DIR}"
: "${SLURM_ARRAY_TASK_ID:?submit with sbatch --array}"
WORK_ROOT=${WORK_ROOT:-${TMPDIR:-/tmp}/dlf-bids-work}

subject=$(find "$BIDS_DIR" -maxdepth 1 -name 'sub-*' -type d -printf '%f\n' | sort \
          | sed -n "${SLURM_ARRAY_TASK_ID}p")
[ -n "$subject" ] || { echo "no participant for task ${SLURM_ARRAY_TASK_ID}" >&2; exit 66; }

mem_args=()
if [ -n "${SLURM_MEM_PER_NODE:-}" ]; then  # MiB granted to this task
    mem_args=(--mem-gb "$(awk -v m="$SLURM_MEM_PER_NODE" 'BEGIN {printf "%.1f", m / 1024}')")
fi
# shellcheck disable=SC2086  # DLF_BIDS_ARGS is a list of options
dlf-bids "$BIDS_DIR" "$OUT_DIR" participant --participant-label "${subject#sub-}" \
  --atlas-dir "$ATLAS_DIR" -w "$WORK_ROOT/$subject" \
  --nprocs "${SLURM_CPUS_PER_TASK:-1}" "${mem_args[@]}" --skip-bids-validation ${DLF_BIDS_ARGS:-}
