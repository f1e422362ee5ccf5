#!/usr/bin/env bash
# LLaVA's two stages, as torchrun runs on one machine:
#   stage 1  image-caption pairs, the projector only (--freeze-vit --freeze-lm), starting from
#            a pretrained checkpoint (an import: `megatron-mimo convert import-hf`);
#   stage 2  instruction data (VQA: question -> answer, loss on the answers), the projector and
#            the language model (--freeze-vit), starting from stage 1's weights.
# Each stage saves to and resumes from its own folder: rerun the script after a stop and every
# finished stage is skipped (a stage's `--pretrained-checkpoint` is only read while its folder
# holds no checkpoint).
#
# On the CPU (defaults): the digits, and a tiny random LLaVA imported from Hugging Face:
#   examples/llava_two_stage.sh
# On GPUs: a real import and real data (Energon folders of CaptioningSample / VQASample):
#   CONFIG=llava_8gpu NPROC=8 PRETRAINED=ckpt/llava-import CAPTIONS=/data/pretrain \
#     VQA=/data/instruct OUT=runs/llava STAGE1_ITERS=2000 STAGE2_ITERS=5000 \
#     examples/llava_two_stage.sh
set -euo pipefail
cd "$(dirname "$0")/.."

CONFIG=${CONFIG:-llava_digits_cpu}
NPROC=${NPROC:-4}
PRETRAINED=${PRETRAINED:-runs/tiny-llava/ckpt}
CAPTIONS=${CAPTIONS:-data/digits}
VQA=${VQA:-data/digits-vqa}
OUT=${OUT:-runs/two-stage}
STAGE1_ITERS=${STAGE1_ITERS:-400}
STAGE2_ITERS=${STAGE2_ITERS:-800}
TRAIN_ARGS=${TRAIN_ARGS:-}
VENV=${VENV:-.venv}
TOKENIZER=${TOKENIZER:-$PRETRAINED/hf}

if [ "$CONFIG" = llava_digits_cpu ]; then  # the CPU demo prepares what it needs, once
  make -s install "$PRETRAINED/latest_checkpointed_iteration.txt" "$CAPTIONS/.nv-meta/dataset.yaml"
  [ -e "$VQA/.nv-meta/dataset.yaml" ] || "$VENV/bin/megatron-mimo" data prepare-digits "$VQA" --vqa
fi

train() {  # train NAME DATA FROM ITERS FLAGS...: one stage, resumable in OUT/NAME
  local name=$1 data=$2 from=$3 iters=$4
  shift 4
  echo "== $name: --data-path $data, from $from, $iters iterations, $*"
  # shellcheck disable=SC2086  # TRAIN_ARGS holds several flags
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} TORCHDYNAMO_DISABLE=1 "$VENV/bin/torchrun" --standalone \
    --nproc-per-node "$NPROC" examples/pretrain_hetero_mimo.py --config "$CONFIG" \
    --data-path "$data" --tokenizer-model "$TOKENIZER" --pretrained-checkpoint "$from" \
    --load "$OUT/$name" --save "$OUT/$name" --train-iters "$iters" --eval-interval "$iters" \
    --metrics-file "$OUT/$name.jsonl" "$@" $TRAIN_ARGS
}

train stage1 "$CAPTIONS" "$PRETRAINED" "$STAGE1_ITERS" --freeze-vit --freeze-lm
# what stage 1 alone answers: one step at learning rate 0 on the instruction data, evaluated
train stage1-on-vqa "$VQA" "$OUT/stage1" 1 --freeze-vit --freeze-lm --lr 0 --min-lr 0 \
  --encoder-lr 0 --encoder-min-lr 0 --lr-warmup-iters 0
train stage2 "$VQA" "$OUT/stage1" "$STAGE2_ITERS" --freeze-vit
