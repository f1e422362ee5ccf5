"""A word-level tokenizer saved with a dataset, and the text sequence one sample becomes.

Captions of small datasets (``"the digit seven"``) need a few dozen words, not a BPE model: the
tokenizer is a JSON list of words stored next to the shards (``tokenizer.json``), so a dataset
and the ids its captions map to travel together and a training run cannot pick the wrong vocabulary.

Sequence of one sample (``seq_length`` tokens)::

    [BOS, <image> x num_image_tokens, word_1 ... word_k, EOS, PAD ...]

With an audio branch the clip's slots follow the image's (``<audio> x num_audio_tokens`` right
after the image slots, :attr:`SequenceLayout.num_audio_tokens`); without one the layout is the
one above, bit for bit.

Labels are the next token; the loss covers the caption words and EOS, never a placeholder slot.
The *answer* is the last caption word (the digit of ``"the digit seven"``): accuracy is the
argmax at the position whose label is that word. An audio sample has a second answer, the word
the clip decides (``audio_answer_position``). An instruction sample (:mod:`megatron_mimo.data.vqa`) puts its question's
tokens before the answer's and keeps them out of the loss (:meth:`SequenceLayout.build_turn`).

A Hugging Face tokenizer (``--tokenizer-model``, :mod:`megatron_mimo.data.hf_tokenizer`) serves
the same :class:`CaptionTokenizer` protocol, so the layout never depends on which one is used.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

import torch

from megatron_mimo.errors import DataError

TOKENIZER_FILENAME = "tokenizer.json"
FORMAT = "megatron-mimo/word-tokenizer/1"
SPECIAL_WORDS = ("<bos>", "<eos>", "<pad>")
BOS_ID, EOS_ID, PAD_ID = 0, 1, 2


class CaptionTokenizer(Protocol):
    """What a sample's layout needs of a tokenizer (word list or Hugging Face)."""

    bos_id: int
    eos_id: int
    pad_id: int
    image_token_id: int | None
    """Id of the image placeholder in this vocabulary; None: the model's (``--image-token-id``)."""

    @property
    def vocab_size(self) -> int: ...

    def encode(self, caption: str, key: str = "?") -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def encode_with_answer(self, caption: str, key: str = "?") -> tuple[list[int], int]:
        """The caption's ids and the index among them of the answer's first token."""
        ...


@dataclass(frozen=True)
class WordTokenizer:
    """Words -> ids by position in ``words`` (the special words come first)."""

    words: tuple[str, ...]
    bos_id: ClassVar[int] = BOS_ID
    eos_id: ClassVar[int] = EOS_ID
    pad_id: ClassVar[int] = PAD_ID
    image_token_id: ClassVar[int | None] = None
    """The word list has no image word: the model's placeholder id (above every word) is used."""

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

    def decode(self, ids: list[int]) -> str:
        """The words of ``ids``, space-separated (special words left out)."""
        return " ".join(self.words[i] for i in ids if len(SPECIAL_WORDS) <= i < len(self.words))

    def encode(self, caption: str, key: str = "?") -> list[int]:
        """Ids of the caption's words; an unknown word is a DataError naming the sample."""
        ids = {word: i for i, word in enumerate(self.words)}
        try:
            return [ids[word] for word in caption.split()]
        except KeyError as error:
            raise DataError(f"sample {key}: word {error.args[0]!r} of caption {caption!r} is not "
                            f"in the dataset's tokenizer ({self.vocab_size} words)") from None

    def encode_with_answer(self, caption: str, key: str = "?") -> tuple[list[int], int]:
        """The caption's ids; the answer is the last one (one id per word)."""
        ids = self.encode(caption, key)
        return ids, len(ids) - 1


@dataclass(frozen=True)
class SequenceLayout:
    """Where the image (and the clip) and the caption go in a ``seq_length`` sequence, with the
    tokenizer's own special ids (a Llama vocabulary has BOS 1, EOS 2, no pad: pad = EOS)."""

    seq_length: int
    num_image_tokens: int
    image_token_id: int
    bos_id: int
    eos_id: int
    pad_id: int
    num_audio_tokens: int = 0
    """Audio slots after the image slots (0: the job has no audio branch)."""
    audio_token_id: int | None = None
    """The model's audio placeholder id (``--audio-token-id``); only with audio slots."""

    def __post_init__(self) -> None:
        if self.num_audio_tokens and self.audio_token_id is None:
            raise ValueError("a layout with audio slots needs the audio token id")

    @classmethod
    def for_tokenizer(cls, tokenizer: CaptionTokenizer, seq_length: int, num_image_tokens: int,
                      image_token_id: int, num_audio_tokens: int = 0,
                      audio_token_id: int | None = None) -> SequenceLayout:
        """The layout of ``tokenizer``'s ids; ``image_token_id`` (and ``audio_token_id``) are
        the model's placeholders."""
        return cls(seq_length, num_image_tokens, image_token_id, tokenizer.bos_id,
                   tokenizer.eos_id, tokenizer.pad_id, num_audio_tokens,
                   audio_token_id if num_audio_tokens else None)

    @property
    def media_tokens(self) -> int:
        """Placeholder slots after BOS: the image's, then the clip's."""
        return self.num_image_tokens + self.num_audio_tokens

    @property
    def _media(self) -> str:
        """What the placeholders are, for error messages."""
        return "the image and the clip" if self.num_audio_tokens else "the image"

    def build(self, caption_ids: list[int], key: str = "?", answer_index: int | None = None,
              audio_answer_index: int | None = None) -> dict[str, torch.Tensor]:
        """input_ids, labels, loss_mask, position_ids and answer_position of one sample (and
        audio_answer_position with audio slots).

        ``answer_index`` is the caption id the accuracy is measured on (default: the last);
        ``answer_position`` is the position whose label is that id. ``audio_answer_index`` is
        the id the clip decides (default: the last)."""
        used = 1 + self.media_tokens + len(caption_ids) + 1
        if used > self.seq_length or not caption_ids:
            raise DataError(f"sample {key}: caption of {len(caption_ids)} tokens needs "
                            f"{used} tokens with {self._media}, --seq-length is "
                            f"{self.seq_length}")
        last = len(caption_ids) - 1
        answer = last if answer_index is None else answer_index
        audio_answer = last if audio_answer_index is None else audio_answer_index
        return self._tensors([], caption_ids, answer, audio_answer)

    def build_turn(self, prompt_ids: list[int], answer_ids: list[int],
                   key: str = "?") -> dict[str, torch.Tensor]:
        """Like :meth:`build` for a question and its answer (``docs/data.md``, "Instruction
        data"): the loss covers only the answer ids and EOS, and ``answer_position`` is the
        position whose label is the answer's first id. An answer that does not fit is an
        error: cut, it would train on a truncated (or no) answer."""
        used = 1 + self.media_tokens + len(prompt_ids) + len(answer_ids) + 1
        if not answer_ids:
            raise DataError(f"sample {key}: the answer has no tokens")
        if used > self.seq_length:
            raise DataError(f"sample {key}: question of {len(prompt_ids)} tokens and answer of "
                            f"{len(answer_ids)} tokens need {used} tokens with {self._media} "
                            f"and EOS, --seq-length is {self.seq_length}: the answer would be "
                            f"cut")
        return self._tensors(prompt_ids, answer_ids, 0, 0)

    def _tensors(self, prompt_ids: list[int], target_ids: list[int], answer_index: int,
                 audio_answer_index: int) -> dict[str, torch.Tensor]:
        """The sample's tensors; the loss covers ``target_ids`` and EOS, not ``prompt_ids`` nor
        a placeholder slot (the label of the last slot is the first text id: its position is
        in the loss only when that id is a target)."""
        text = prompt_ids + target_ids + [self.eos_id]
        input_ids = torch.full((self.seq_length,), self.pad_id, dtype=torch.long)
        input_ids[0] = self.bos_id
        input_ids[1:1 + self.num_image_tokens] = self.image_token_id
        if self.num_audio_tokens:
            audio = 1 + self.num_image_tokens
            input_ids[audio:audio + self.num_audio_tokens] = self.audio_token_id
        start = 1 + self.media_tokens
        input_ids[start:start + len(text)] = torch.tensor(text)
        labels = torch.roll(input_ids, -1)
        target = start + len(prompt_ids)
        loss_mask = torch.zeros(self.seq_length)
        loss_mask[target - 1:target + len(target_ids)] = 1.0  # labels: a target id or EOS
        out = {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
               "position_ids": torch.arange(self.seq_length),
               "answer_position": torch.tensor(target + answer_index - 1)}
        if self.num_audio_tokens:
            out["audio_answer_position"] = torch.tensor(target + audio_answer_index - 1)
        return out


def word_token_index(tokenizer: CaptionTokenizer, caption: str, word_index: int,
                     key: str = "?", ids: list[int] | None = None) -> tuple[list[int], int]:
    """The caption's ids and the index among them of the first token of its ``word_index``-th
    whitespace-separated word (an answer that is not the caption's last word).

    The caption up to that word is encoded on its own: its answer token is the one sought, and
    its ids must be a prefix of the whole caption's (a tokenizer that merges across the word's
    end would make the position ambiguous: an error naming the sample). ``ids``: the whole
    caption's ids, when the caller has them already."""
    words = list(re.finditer(r"\S+", caption))
    if not 0 <= word_index < len(words):
        raise DataError(f"sample {key}: answer word {word_index} of caption {caption!r} does not "
                        f"exist (the caption has {len(words)} words, counted from 0)")
    ids = tokenizer.encode(caption, key) if ids is None else ids
    prefix, index = tokenizer.encode_with_answer(caption[:words[word_index].end()], key)
    if ids[:len(prefix)] != prefix:
        raise DataError(f"sample {key}: the tokenizer encodes caption {caption!r} up to word "
                        f"{word_index} differently from the whole caption: the answer's token is "
                        f"ambiguous")
    return ids, index
