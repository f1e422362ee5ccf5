#!/usr/bin/env bash
# LLaVA's two stages as two Slurm jobs, the second starting when the first succeeded
# (--dependency=afterok). Each runs slurm/train_hetero.sbatch (requeue on preemption, resume
# from its own JOB_DIR); stage 2 starts from stage 1's weights with --pretrained-checkpoint.
#
#   CONFIG=llava_8gpu PRETRAINED=/shared/ckpt/llava-import CAPTIONS=/data/pretrain \
#     VQA=/data/instruct OUT=/shared/runs/llava slurm/llava_two_stage.sh -N 1 --gpus-per-node 8
#
# Arguments go to both sbatch calls. DRY_RUN=1 prints the sbatch commands. Prints the job ids.
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
export MIMO_ROOT=${MIMO_ROOT:-$(cd "$HERE/.." && pwd)}
export CONFIG=${CONFIG:-llava_digits_cpu}
PRETRAINED=${PRETRAINED:?the checkpoint stage 1 starts from (megatron-mimo convert import-hf)}
CAPTIONS=${CAPTIONS:?Energon folder of image-caption pairs}
VQA=${VQA:?Energon folder of VQA samples}
OUT=${OUT:?folder for both stages (stage1/, stage2/), on a filesystem every node sees}
TOKENIZER=${TOKENIZER:-$PRETRAINED/hf}
COMMON="--tokenizer-model $TOKENIZER ${TRAIN_ARGS:-}"

submit() {  # submit NAME DEPENDENCY TRAIN_ARGS: one stage's job id
  local name=$1 dependency=$2 args=$3
  shift 3
  local cmd=(sbatch --parsable --export=ALL --job-name "llava-$name" "$@")
  [ -n "$dependency" ] && cmd+=(--dependency="afterok:$dependency")
  cmd+=("$HERE/train_hetero.sbatch")
  if [ "${DRY_RUN:-0}" = 1 ]; then
    echo "JOB_DIR=$OUT/$name TRAIN_ARGS=\"$args\" ${cmd[*]}" >&2
    echo "<$name>"
    return
  fi
  JOB_DIR=$OUT/$name TRAIN_ARGS=$args "${cmd[@]}"
}

first=$(submit stage1 "" "--data-path $CAPTIONS --pretrained-checkpoint $PRETRAINED \
--freeze-vit --freeze-lm $COMMON" "$@")
second=$(submit stage2 "$first" "--data-path $VQA --pretrained-checkpoint $OUT/stage1 \
--freeze-vit $COMMON" "$@")
echo "$first"
echo "$second"
