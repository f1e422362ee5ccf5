"""Deterministic mock image-text data: sample ``g`` is a pure function of ``(seed, g)``.

Each sample is an image whose pixel pattern encodes a class ``c``, and a text sequence
``[BOS, <image> x P, c, c+1, c+2, ...]``. Every sample carries its global index, so a resumed
run can be checked index by index.

With an audio branch (``audio=`` an :class:`AudioModelConfig`) each sample also has a clip's
log-mel features whose pattern encodes an *audio class* ``a``, drawn from its own random stream
(independent of the image class), and the text becomes
``[BOS, <image> x P, <audio> x A, t(c), u(a), c+1, ...]``: the first text token is decided by
the image, the second by the clip. Without audio every sample is the same, bit for bit, as
before the audio branch existed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from megatron_mimo.config.models import AudioModelConfig, ImagesModelConfig, LanguageModelConfig

BOS_TOKEN = 0
NUM_CLASSES = 16
EVAL_INDEX_BASE = 1 << 40
"""Evaluation samples live far from training indices so the two never overlap."""
AUDIO_NOISE = 0.1
"""Standard deviation of the noise on the mock features (the class pattern spans [-0.5, 1.5])."""


@dataclass(frozen=True, init=False)
class MockImageText:
    """The mock dataset: shapes from the model configs, content from ``seed`` and the index."""

    images: ImagesModelConfig
    language: LanguageModelConfig
    seed: int
    audio_model: AudioModelConfig | None
    """The audio encoder's sizes; None: no audio branch (no clips, no audio slots)."""

    def __init__(self, images: ImagesModelConfig, language: LanguageModelConfig, seed: int,
                 audio: AudioModelConfig | None = None) -> None:
        object.__setattr__(self, "images", images)
        object.__setattr__(self, "language", language)
        object.__setattr__(self, "seed", seed)
        object.__setattr__(self, "audio_model", audio)

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + index) % (1 << 62))

    def _audio_generator(self, index: int) -> torch.Generator:
        """A stream of its own (a hash of seed and index, not an offset of the image stream):
        the audio class never follows the image class of this or another sample."""
        digest = hashlib.blake2b(f"mock audio {self.seed} {index}".encode(), digest_size=8)
        return torch.Generator().manual_seed(int.from_bytes(digest.digest(), "little") >> 2)

    def image_class(self, index: int) -> int:
        """The class a sample's image encodes (what the text after the image starts with)."""
        return int(torch.randint(NUM_CLASSES, (1,), generator=self._generator(index)).item())

    def audio_class(self, index: int) -> int:
        """The class a sample's clip encodes (what the second text token says)."""
        return int(torch.randint(NUM_CLASSES, (1,), generator=self._audio_generator(index)).item())

    def pixels(self, indices: list[int]) -> torch.Tensor:
        """Images ``[b, 3, H, W]``: class-dependent stripes plus noise."""
        side = self.images.image_size
        images = []
        for index in indices:
            gen = self._generator(index)
            cls = int(torch.randint(NUM_CLASSES, (1,), generator=gen).item())
            stripes = torch.arange(side, dtype=torch.float32).mul(2 * torch.pi * (cls + 1) / side).sin()
            noise = 0.1 * torch.randn(3, side, side, generator=gen)
            images.append(stripes.expand(3, side, side) + noise)
        return torch.stack(images)

    def audio(self, indices: list[int]) -> torch.Tensor:
        """Log-mel features ``[b, num_mel_bins, max_frames]``: a clip of a random number of
        frames whose mel profile is class-dependent stripes, plus noise, then silence (the
        padding real clips get)."""
        from megatron_mimo.data.audio import silence

        cfg = self._require_audio()
        bins, frames = cfg.num_mel_bins, cfg.max_frames
        clips = []
        for index in indices:
            gen = self._audio_generator(index)
            cls = int(torch.randint(NUM_CLASSES, (1,), generator=gen).item())
            length = int(torch.randint(max(1, frames // 4), frames + 1, (1,), generator=gen).item())
            profile = torch.arange(bins, dtype=torch.float32).mul(2 * torch.pi * (cls + 1) / bins).sin()
            features = silence(cfg)
            noise = AUDIO_NOISE * torch.randn(bins, length, generator=gen)
            features[:, :length] = 0.5 + profile[:, None] + noise
            clips.append(features)
        return torch.stack(clips)

    def _require_audio(self) -> AudioModelConfig:
        if self.audio_model is None:
            raise ValueError("this mock dataset has no audio (built without an audio config)")
        return self.audio_model

    def tokens(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Text side ``[b, s]``: input ids, labels (next token), loss mask, position ids."""
        if self.audio_model is not None:
            return self._tokens_with_audio(indices)
        seq, image_len = self.language.seq_length, self.images.num_image_tokens
        text_len = seq - 1 - image_len
        vocab_for_text = self.language.vocab_size - 2  # exclude BOS-as-0 overlap and image token
        rows = []
        for index in indices:
            cls = self.image_class(index)
            text = (torch.arange(text_len) + cls * 7) % vocab_for_text + 1
            text += text >= self.language.image_token_id  # never the image token (any id)
            image = torch.full((image_len,), self.language.image_token_id)
            rows.append(torch.cat([torch.tensor([BOS_TOKEN]), image, text]))
        return self._text_tensors(indices, torch.stack(rows), image_len)

    def _tokens_with_audio(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """As :meth:`tokens`, with the clip's slots after the image's and the second text token
        decided by the audio class (``audio_answer_position``: the position whose label it is)."""
        lang = self.language
        seq, image_len = lang.seq_length, self.images.num_image_tokens
        audio_len = self._require_audio().num_audio_tokens
        media = image_len + audio_len
        placeholders = sorted((lang.image_token_id, lang.audio_token_id))
        vocab_for_text = lang.vocab_size - 3  # BOS-as-0 and the two placeholders excluded
        rows = []
        for index in indices:
            text = (torch.arange(seq - 1 - media) + self.image_class(index) * 7) % vocab_for_text
            text[1] = (self.audio_class(index) * 5 + 3) % vocab_for_text
            text += 1
            for token in placeholders:  # in increasing order: never a placeholder id
                text += text >= token
            rows.append(torch.cat([torch.tensor([BOS_TOKEN]),
                                   torch.full((image_len,), lang.image_token_id),
                                   torch.full((audio_len,), lang.audio_token_id), text]))
        out = self._text_tensors(indices, torch.stack(rows), media)
        out["audio_answer_position"] = torch.full((len(indices),), media + 1)
        return out

    def _text_tensors(self, indices: list[int], input_ids: torch.Tensor,
                      media: int) -> dict[str, torch.Tensor]:
        """Labels and masks of ``input_ids`` whose placeholders fill positions 1..``media``."""
        seq = self.language.seq_length
        labels = torch.roll(input_ids, -1, dims=1)
        loss_mask = torch.ones_like(labels, dtype=torch.float32)
        loss_mask[:, :media] = 0.0  # no loss where the label is a placeholder slot
        loss_mask[:, -1] = 0.0  # the last position has no next token
        position_ids = torch.arange(seq).expand(len(indices), seq).clone()
        answer_position = torch.full((len(indices),), media)  # label: the first text token
        return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
                "position_ids": position_ids, "answer_position": answer_position,
                "sample_index": torch.tensor(indices, dtype=torch.long)}
