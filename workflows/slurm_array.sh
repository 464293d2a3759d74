#!/usr/bin/env bash
# One SLURM array task per participant, then the group level once all tasks are done:
#
#   N=$(ls -d "$BIDS_DIR"/sub-* | wc -l)
#   jid=$(sbatch --parsable --array=1-"$N" workflows/slurm_array.sh)
#   sbatch --dependency=afterany:"$jid" --wrap "dlf-bids $BIDS_DIR $OUT_DIR group"
#
# Each task gets its own work dir (no shared pybids index, no 'database is locked').
#SBATCH --job-name=dlf-bids
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
#SBATCH --time=04:00:00
set -euo pipefail
: "${BIDS_DIR:?set BIDS_DIR}" "${OUT_DIR:?set OUT_DIR}" "${ATLAS_DIR:?set ATLAS_DIR}"
WORK_ROOT=${WORK_ROOT:-${TMPDIR:-/tmp}/dlf-bids-work}

subject=$(find "$BIDS_DIR" -maxdepth 1 -name 'sub-*' -type d -printf '%f\n' | sort \
          | sed -n "${SLURM_ARRAY_TASK_ID}p")
[ -n "$subject" ] || { echo "no participant for task ${SLURM_ARRAY_TASK_ID}" >&2; exit 66; }

dlf-bids "$BIDS_DIR" "$OUT_DIR" participant --participant-label "$subject" \
  --atlas-dir "$ATLAS_DIR" -w "$WORK_ROOT/$subject" \
  --nprocs "${SLURM_CPUS_PER_TASK:-1}" --mem-gb 8 --skip-bids-validation
