"""Write a tiny random Hugging Face LLaVA (a CLIP or SigLIP tower, LLaVA's projector, a Llama
LLM with grouped-query attention) and a word tokenizer holding ``<image>``: the stand-in for a
downloaded model in the tests and in ``make train CONFIG=llava_digits_cpu`` (nothing is
downloaded; needs ``transformers``, part of the test extra).

    python examples/tiny_llava.py OUT [--tower clip|siglip] [--separate]

``--separate`` writes ``OUT/vision`` (a CLIP/SigLIP vision model) and ``OUT/language`` (a Llama
model) instead of one LLaVA directory: how stage-1 pretraining starts.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_mimo.data.digits import DIGIT_WORDS, caption_of
from megatron_mimo.data.hf_tokenizer import write_word_level

IMAGE_TOKEN_ID = 4
"""``<image>`` in the word tokenizer (after ``<s> </s> <pad> <unk>``)."""
EXTRA_WORDS = ("which", "digit", "is", "this", "?", "even", "odd", "yes", "no", "plus", "what")
"""Words beyond the captions, so instruction data can reuse the tokenizer."""


def vocabulary() -> list[str]:
    """The words of the digits captions and questions."""
    return [caption_of(label) for label in range(len(DIGIT_WORDS))] + list(EXTRA_WORDS)


def configs(tower: str, vocab_size: int, image_size: int = 32, patch_size: int = 8,
            tie: bool = False):
    """Vision and text configs of the tiny model (sizes of the ``digits_cpu`` preset)."""
    from transformers import CLIPVisionConfig, LlamaConfig, SiglipVisionConfig

    vision_class = CLIPVisionConfig if tower == "clip" else SiglipVisionConfig
    vision = vision_class(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, image_size=image_size, patch_size=patch_size)
    text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                       max_position_embeddings=64, bos_token_id=0, eos_token_id=1,
                       pad_token_id=2, tie_word_embeddings=tie)
    return vision, text


def build(out: Path, tower: str = "clip", separate: bool = False, seed: int = 0,
          tie: bool = False) -> Path:
    """Write the model (and its tokenizer) under ``out``; returns ``out``. ``tie``: the output
    layer reuses the word embeddings (no ``lm_head`` in the file)."""
    import torch
    from transformers import (
        CLIPVisionModel,
        LlamaForCausalLM,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionModel,
    )
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one tiny file: no "Writing model shards" bar
    torch.manual_seed(seed)
    out = Path(out)
    words = vocabulary()
    tokenizer_dir = out / "language" if separate else out
    write_word_level(words, tokenizer_dir)
    from tokenizers import Tokenizer

    vocab_size = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size()
    vision, text = configs(tower, vocab_size, tie=tie)
    if separate:
        vision_class = CLIPVisionModel if tower == "clip" else SiglipVisionModel
        vision_class(vision).save_pretrained(out / "vision")
        LlamaForCausalLM(text).save_pretrained(out / "language")
        return out
    strategy = "default" if tower == "clip" else "full"
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN_ID,
                         vision_feature_layer=-2, vision_feature_select_strategy=strategy,
                         image_seq_length=(vision.image_size // vision.patch_size) ** 2)
    LlavaForConditionalGeneration(config).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--tower", choices=("clip", "siglip"), default="clip")
    parser.add_argument("--separate", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.out, args.tower, args.separate, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
