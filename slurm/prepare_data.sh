#!/bin/bash
# Data preparation under SLURM (CPU only): tokenizer, language corpus, teacher propositions.
#
#   sbatch slurm/prepare_data.sh 'corpus/*.jsonl' data            # inputs (files or globs) and output folder
#
# Environment knobs: TOKENIZER_HF=<gpt2 dir> imports GPT-2's tokenizer instead of training one;
# VOCAB (default 32000), TASKS (default recipes/tasks.yaml), ONLY (task names, default all with a train split).
#SBATCH --job-name=freelm-data
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --output=%x-%j.log
set -euo pipefail

INPUT=${1:?usage: sbatch slurm/prepare_data.sh INPUT_GLOB OUT_DIR}
OUT=${2:?usage: sbatch slurm/prepare_data.sh INPUT_GLOB OUT_DIR}
FREELM=${FREELM:-.venv/bin/freelm}
WORKERS=${SLURM_CPUS_PER_TASK:-2}

if [ -n "${TOKENIZER_HF:-}" ]; then
  "$FREELM" tokenizer import --hf "$TOKENIZER_HF" --out "$OUT/tok"
else
  "$FREELM" tokenizer train --input "$INPUT" --vocab-size "${VOCAB:-32000}" --out "$OUT/tok"
fi
"$FREELM" data corpus --input "$INPUT" --tokenizer "$OUT/tok" --out "$OUT/lm/corpus" --workers "$WORKERS"
"$FREELM" data tasks --config "${TASKS:-recipes/tasks.yaml}" --split train ${ONLY:+--only "$ONLY"} \
  --tokenizer "$OUT/tok" --out "$OUT/teacher"
echo "freelm: data ready: data.tokenizer=$OUT/tok data.corpora=[$OUT/lm/corpus] data.teacher=$OUT/teacher/train"
