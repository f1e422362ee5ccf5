"""A word-level tokenizer saved with a dataset, and the text sequence one sample becomes.

Captions of small datasets (``"the digit seven"``) need a few dozen words, not a BPE model: the
tokenizer is a JSON list of words stored next to the shards (``tokenizer.json``), so a dataset
and the ids its captions map to travel together and a training run cannot pick the wrong vocabulary.

Sequence of one sample (``seq_length`` tokens)::

    [BOS, <image> x num_image_tokens, word_1 ... word_k, EOS, PAD ...]

Labels are the next token; the loss covers the caption words and EOS. The *answer* is the last
caption word (the digit of ``"the digit seven"``): accuracy is the argmax at the position whose
label is that word.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_mimo.errors import DataError

TOKENIZER_FILENAME = "tokenizer.json"
FORMAT = "megatron-mimo/word-tokenizer/1"
SPECIAL_WORDS = ("<bos>", "<eos>", "<pad>")
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2


@dataclass(frozen=True)
class WordTokenizer:
    """Words -> ids by position in ``words`` (the special words come first)."""

    words: tuple[str, ...]

    @classmethod
    def from_captions(cls, captions: list[str]) -> WordTokenizer:
        """The special words, then every caption word in first-seen order."""
        seen = dict.fromkeys(SPECIAL_WORDS)
        for caption in captions:
            seen.update(dict.fromkeys(caption.split()))
        return cls(tuple(seen))

    @classmethod
    def load(cls, dataset: Path) -> WordTokenizer:
        """Read ``dataset/tokenizer.json``; a missing or foreign file is a DataError naming it."""
        path = Path(dataset) / TOKENIZER_FILENAME
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise DataError(f"{path}: cannot read the dataset's tokenizer ({error}); prepare the "
                            f"dataset with `megatron-mimo data prepare-digits` or write a word "
                            f"list there (see docs/data.md)") from error
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise DataError(f"{path}: not a {FORMAT} tokenizer")
        words = tuple(data["words"])
        if words[:len(SPECIAL_WORDS)] != SPECIAL_WORDS:
            raise DataError(f"{path}: the first words must be {list(SPECIAL_WORDS)}")
        return cls(words)

    def save(self, dataset: Path) -> Path:
        """Write ``dataset/tokenizer.json``."""
        path = Path(dataset) / TOKENIZER_FILENAME
        path.write_text(json.dumps({"format": FORMAT, "words": list(self.words)}, indent=1) + "\n")
        return path

    @property
    def vocab_size(self) -> int:
        """Number of words, specials included."""
        return len(self.words)

    def encode(self, caption: str, key: str = "?") -> list[int]:
        """Ids of the caption's words; an unknown word is a DataError naming the sample."""
        ids = {word: i for i, word in enumerate(self.words)}
        try:
            return [ids[word] for word in caption.split()]
        except KeyError as error:
            raise DataError(f"sample {key}: word {error.args[0]!r} of caption {caption!r} is not "
                            f"in the dataset's tokenizer ({self.vocab_size} words)") from None


@dataclass(frozen=True)
class SequenceLayout:
    """Where the image and caption go in a ``seq_length`` sequence."""

    seq_length: int
    num_image_tokens: int
    image_token_id: int

    def build(self, caption_ids: list[int], key: str = "?") -> dict[str, torch.Tensor]:
        """input_ids, labels, loss_mask, position_ids and answer_position of one sample."""
        text = caption_ids + [EOS_ID]
        used = 1 + self.num_image_tokens + len(text)
        if used > self.seq_length or not caption_ids:
            raise DataError(f"sample {key}: caption of {len(caption_ids)} words needs "
                            f"{used} tokens with the image, --seq-length is {self.seq_length}")
        input_ids = torch.full((self.seq_length,), PAD_ID, dtype=torch.long)
        input_ids[0] = BOS_ID
        input_ids[1:1 + self.num_image_tokens] = self.image_token_id
        start = 1 + self.num_image_tokens
        input_ids[start:start + len(text)] = torch.tensor(text)
        labels = torch.roll(input_ids, -1)
        loss_mask = torch.zeros(self.seq_length)
        loss_mask[start - 1:start - 1 + len(text)] = 1.0  # positions whose label is a caption word/EOS
        return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
                "position_ids": torch.arange(self.seq_length),
                "answer_position": torch.tensor(start + len(caption_ids) - 2)}
