"""Deterministic mock image-text data: sample ``g`` is a pure function of ``(seed, g)``.

Each sample is an image whose pixel pattern encodes a class ``c``, and a text sequence
``[BOS, <image> x P, c, c+1, c+2, ...]``. Every sample carries its global index, so a resumed
run can be checked index by index.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_mimo.config.models import ImagesModelConfig, LanguageModelConfig

BOS_TOKEN = 0
NUM_CLASSES = 16
EVAL_INDEX_BASE = 1 << 40
"""Evaluation samples live far from training indices so the two never overlap."""


@dataclass(frozen=True)
class MockImageText:
    """The mock dataset: shapes from the model configs, content from ``seed`` and the index."""

    images: ImagesModelConfig
    language: LanguageModelConfig
    seed: int

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + index) % (1 << 62))

    def image_class(self, index: int) -> int:
        """The class a sample's image encodes (what the text after the image starts with)."""
        return int(torch.randint(NUM_CLASSES, (1,), generator=self._generator(index)).item())

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

    def tokens(self, indices: list[int]) -> dict[str, torch.Tensor]:
        """Text side ``[b, s]``: input ids, labels (next token), loss mask, position ids."""
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
        input_ids = torch.stack(rows)
        labels = torch.roll(input_ids, -1, dims=1)
        loss_mask = (labels != self.language.image_token_id).float()  # no loss on image slots
        loss_mask[:, -1] = 0.0  # the last position has no next token
        position_ids = torch.arange(seq).expand(len(indices), seq).clone()
        answer_position = torch.full((len(indices),), image_len)  # label: the first text token
        return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
                "position_ids": position_ids, "answer_position": answer_position,
                "sample_index": torch.tensor(indices, dtype=torch.long)}
