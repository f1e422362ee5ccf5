"""A Hugging Face tokenizer for captions (``--tokenizer-model DIR``, Megatron-LM's flag name).

A pretrained language model only understands the ids of its own tokenizer, so a run that
starts from one must tokenize captions with it, not with the dataset's word list. ``DIR`` holds
``tokenizer.json`` (read with the ``tokenizers`` library, an optional dependency imported on
first use) and, when present, ``tokenizer_config.json`` (which names the special tokens).

- BOS/EOS/pad are the config's ``bos_token``/``eos_token``/``pad_token`` (strings or
  ``{"content": ...}``), else the tokenizer's own (``<s>``, ``</s>``, ...); no pad token: the
  EOS id pads, as with Llama (padded positions are outside the loss anyway).
- The image placeholder is the vocabulary's ``<image>`` token (LLaVA's); its id must be the
  model's ``--image-token-id``. With an audio branch, a vocabulary's ``<audio>`` must be the
  model's ``--audio-token-id``; without one, that id must lie above the tokenizer's ids.
- The answer is the FIRST token of the caption's last whitespace-separated word, found from
  the encoding's character offsets (a BPE word may be several tokens; only one is compared).
- A caption token that is the unknown token is an error naming the sample and the word: a
  silently ``<unk>`` caption would train the model on the wrong text.
- The chat template (instruction samples, :mod:`megatron_mimo.data.vqa`) is read as transformers
  reads it: ``chat_template.jinja`` if the folder has one, else the config's ``chat_template``
  (a string, or a list of named templates of which ``default`` is used); none: the built-in
  default of :mod:`megatron_mimo.data.vqa`.

:func:`write_word_level` writes a real (WordLevel) Hugging Face tokenizer, so tests and examples
give a tiny in-process model a tokenizer without downloading anything.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_mimo.errors import DataError

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
IMAGE_TOKEN = "<image>"
AUDIO_TOKEN = "<audio>"
"""The audio placeholder a tokenizer may hold (with an audio branch)."""
FALLBACKS: dict[str, tuple[str, ...]] = {
    "bos_token": ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]"),
    "eos_token": ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[SEP]"),
    "pad_token": ("<pad>", "[PAD]"),
    "unk_token": ("<unk>", "[UNK]"),
}
"""Special tokens looked up, in order, when the config does not name one."""
WORD_LEVEL_SPECIALS = ("<s>", "</s>", "<pad>", "<unk>", IMAGE_TOKEN)
"""Ids 0..4 of a tokenizer from :func:`write_word_level`."""


@dataclass(frozen=True, eq=False)
class HFTokenizer:
    """Captions -> ids with a Hugging Face ``tokenizers.Tokenizer``; see the module docstring."""

    backend: Any
    """The ``tokenizers.Tokenizer``."""
    path: Path
    """Its ``tokenizer.json`` (what errors name)."""
    bos_id: int
    eos_id: int
    pad_id: int
    unk_id: int | None
    """Id of the unknown token, None if the tokenizer has none (byte-level BPE)."""
    image_token_id: int
    vocab_size: int
    """Largest id + 1 (added tokens included): the model's vocabulary must hold every id."""
    chat_template: str | None = None
    """Jinja source of the chat template stored with the tokenizer; None: it has none."""

    @classmethod
    def load(cls, directory: str | Path) -> HFTokenizer:
        """Read ``directory/tokenizer.json`` (and ``tokenizer_config.json`` if present)."""
        directory = Path(directory)
        path = directory / TOKENIZER_FILE
        backend = read_backend(path)
        config = _read_config(directory / CONFIG_FILE)
        specials = SpecialTokens(backend, path, directory / CONFIG_FILE, config)
        image_id = backend.token_to_id(IMAGE_TOKEN)
        if image_id is None:
            raise DataError(f"{path}: the tokenizer has no {IMAGE_TOKEN!r} token (the image "
                            f"placeholder, as in LLaVA): add it as a special token")
        eos_id = specials.required("eos_token")
        pad_id = specials.optional("pad_token")
        vocab = backend.get_vocab(with_added_tokens=True)
        return cls(backend, path, specials.required("bos_token"), eos_id,
                   eos_id if pad_id is None else pad_id, specials.optional("unk_token"),
                   image_id, max(vocab.values()) + 1,
                   read_chat_template(directory, directory / CONFIG_FILE, config))

    def template_tokens(self) -> dict[str, str]:
        """The special tokens a chat template may print, as transformers passes them."""
        return {"bos_token": self.backend.id_to_token(self.bos_id),
                "eos_token": self.backend.id_to_token(self.eos_id),
                "pad_token": self.backend.id_to_token(self.pad_id)}

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` (special tokens left out)."""
        return self.backend.decode(ids, skip_special_tokens=True)

    def encode(self, caption: str, key: str = "?") -> list[int]:
        """Ids of the caption, no special tokens added (the layout adds BOS and EOS)."""
        return self.encode_with_answer(caption, key)[0]

    def encode_with_answer(self, caption: str, key: str = "?") -> tuple[list[int], int]:
        """The caption's ids and the index of the first token of its last word."""
        encoding = self.backend.encode(caption, add_special_tokens=False)
        ids = list(encoding.ids)
        if self.unk_id is not None and self.unk_id in ids:
            start, end = encoding.offsets[ids.index(self.unk_id)]
            raise DataError(f"sample {key}: word {word_at(caption, start, end)!r} of caption "
                            f"{caption!r} is the unknown token (id {self.unk_id}) of {self.path}")
        return ids, answer_index(caption, encoding.offsets)

    def check_model(self, image_token_id: int, vocab_size: int) -> None:
        """Refuse ids the model does not have, or an image placeholder it does not expect."""
        if self.vocab_size > vocab_size:
            raise DataError(f"{self.path}: ids go up to {self.vocab_size - 1} but the model's "
                            f"--vocab-size is {vocab_size}: raise --vocab-size to at least "
                            f"{self.vocab_size}")
        if self.image_token_id != image_token_id:
            raise DataError(f"{self.path}: {IMAGE_TOKEN!r} is id {self.image_token_id} but the "
                            f"model's image token id is {image_token_id}: pass --image-token-id "
                            f"{self.image_token_id}")

    def check_audio_token(self, audio_token_id: int) -> None:
        """With an audio branch: the vocabulary's ``<audio>`` must be the model's audio
        placeholder; without one, the placeholder must be no id of the tokenizer (a caption
        token equal to it would be taken for an audio slot)."""
        own = self.backend.token_to_id(AUDIO_TOKEN)
        if own is not None and own != audio_token_id:
            raise DataError(f"{self.path}: {AUDIO_TOKEN!r} is id {own} but the model's audio "
                            f"token id is {audio_token_id}: pass --audio-token-id {own}")
        if own is None and audio_token_id < self.vocab_size:
            raise DataError(f"{self.path}: the model's audio token id {audio_token_id} is the "
                            f"tokenizer's {self.backend.id_to_token(audio_token_id)!r}: add an "
                            f"{AUDIO_TOKEN!r} token or pass an --audio-token-id of at least "
                            f"{self.vocab_size}")


class SpecialTokens:
    """The config's special tokens (or the tokenizer's own), as ids of ``backend``."""

    def __init__(self, backend: Any, path: Path, config_path: Path,
                 config: dict[str, Any]) -> None:
        self.backend, self.path, self.config_path, self.config = backend, path, config_path, config

    def optional(self, name: str) -> int | None:
        """Id of the config's ``name`` token, else of the first fallback the vocabulary has."""
        token = token_content(self.config.get(name))
        if token is not None:
            token_id = self.backend.token_to_id(token)
            if token_id is None:
                raise DataError(f"{self.config_path}: {name} {token!r} is not in {self.path}")
            return token_id
        candidates = FALLBACKS[name]
        if name == "unk_token":
            candidates = (getattr(self.backend.model, "unk_token", None), *candidates)
        ids = (self.backend.token_to_id(t) for t in candidates if t)
        return next((i for i in ids if i is not None), None)

    def required(self, name: str) -> int:
        """Like :meth:`optional`; a tokenizer without such a token is an error."""
        token_id = self.optional(name)
        if token_id is None:
            raise DataError(f"{self.path}: no {name} (none of {list(FALLBACKS[name])} is in the "
                            f"vocabulary): set {name} in {self.config_path}")
        return token_id


def token_content(value: Any) -> str | None:
    """A config's special token: a string, ``{"content": ...}`` (an AddedToken) or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) and value else None


def answer_index(caption: str, offsets: list[tuple[int, int]]) -> int:
    """Index of the first token that reaches into the caption's last whitespace-separated word
    (a token may start at the space before it: SentencePiece's ``▁``)."""
    words = caption.split()
    if not words:
        return len(offsets) - 1
    start = len(caption.rstrip()) - len(words[-1])
    return next((i for i, (_, end) in enumerate(offsets) if end > start), len(offsets) - 1)


def word_at(caption: str, start: int, end: int) -> str:
    """The whitespace-separated word of ``caption`` holding characters ``[start, end)``."""
    position = max(start, end - 1)
    for match in re.finditer(r"\S+", caption):
        if match.start() <= position < match.end():
            return match.group()
    return caption[start:end]


def read_chat_template(directory: Path, config_path: Path, config: dict[str, Any]) -> str | None:
    """The folder's chat template with transformers' precedence (module docstring); None: none."""
    path = directory / CHAT_TEMPLATE_FILE
    if path.exists():
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            reason = " ".join(str(error).split())
            raise DataError(f"{path}: cannot read the chat template ({reason})") from None
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise DataError(f"{config_path}: chat_template lists the templates "
                            f"{sorted(map(str, named))} but none named 'default'")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise DataError(f"{config_path}: chat_template is a {type(template).__name__}, not a "
                        f"string or a list of named templates")
    return template or None


def read_backend(path: Path) -> Any:
    """The ``tokenizers.Tokenizer`` of ``path``; any failure is one line naming the file."""
    try:
        from tokenizers import Tokenizer
    except ImportError as error:
        raise DataError("--tokenizer-model needs the tokenizers library: pip install "
                        "'megatron-mimo[hf]'") from error
    try:
        return Tokenizer.from_file(str(path))
    except Exception as error:  # noqa: BLE001 - tokenizers raises a bare Exception
        reason = " ".join(str(error).split())
        raise DataError(f"{path}: cannot read the Hugging Face tokenizer ({reason}); "
                        f"--tokenizer-model must name a folder holding tokenizer.json") from None


def _read_config(path: Path) -> dict[str, Any]:
    """``tokenizer_config.json`` as a dict; absent: empty (the fallbacks apply)."""
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = " ".join(str(error).split())
        raise DataError(f"{path}: cannot read the tokenizer config ({reason})") from None
    if not isinstance(config, dict):
        raise DataError(f"{path}: the tokenizer config is not a JSON object")
    return config


def write_word_level(words: Iterable[str], out_dir: str | Path) -> Path:
    """Write a Hugging Face WordLevel tokenizer of ``words`` (captions work too: every
    whitespace-separated word is taken, first-seen order) to ``out_dir``; returns ``out_dir``.

    Ids: ``<s> </s> <pad> <unk> <image>`` = 0..4, then the words. The folder loads with
    :meth:`HFTokenizer.load` and with ``transformers.PreTrainedTokenizerFast.from_pretrained``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers

    tokens = dict.fromkeys(WORD_LEVEL_SPECIALS) | dict.fromkeys(
        word for text in words for word in text.split())
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.add_special_tokens(list(WORD_LEVEL_SPECIALS))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend.save(str(out / TOKENIZER_FILE))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
              "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    return out
