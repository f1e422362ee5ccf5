"""Deterministic mock image-text data and the per-branch resumable sampler.

Sample ``g`` is a pure function of ``(seed, g)``: an image whose pixel pattern encodes a class
``c``, and a text sequence ``[BOS, <image> x P, c, c+1, c+2, ...]``. Every sample carries its
global index, so a resumed run can be checked index by index.

Batches follow the layout: one micro-step consumes ``job_micro_batch`` consecutive sample
indices; DP rank ``r`` of a branch with DP size ``D`` takes the ``r``-th of ``D`` equal slices.
The bridge concatenates encoder DP slices in DP order, so both branches see the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_mimo.config import EncoderModelConfig, LanguageModelConfig

BOS_TOKEN = 0
NUM_CLASSES = 16
EVAL_INDEX_BASE = 1 << 40
"""Evaluation samples live far from training indices so the two never overlap."""


@dataclass(frozen=True)
class MockImageText:
    """The mock dataset: shapes from the model configs, content from ``seed`` and the index."""

    encoder: EncoderModelConfig
    language: LanguageModelConfig
    seed: int

    def _generator(self, index: int) -> torch.Generator:
        return torch.Generator().manual_seed((self.seed * 1_000_003 + index) % (1 << 62))

    def image_class(self, index: int) -> int:
        """The class a sample's image encodes (what the text after the image starts with)."""
        return int(torch.randint(NUM_CLASSES, (1,), generator=self._generator(index)).item())

    def pixels(self, indices: list[int]) -> torch.Tensor:
        """Images ``[b, 3, H, W]``: class-dependent stripes plus noise."""
        side = self.encoder.image_size
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
        seq, image_len = self.language.seq_length, self.encoder.num_image_tokens
        text_len = seq - 1 - image_len
        vocab_for_text = self.language.vocab_size - 2  # exclude BOS-as-0 overlap and image token
        rows = []
        for index in indices:
            cls = self.image_class(index)
            text = (torch.arange(text_len) + cls * 7) % vocab_for_text + 1
            image = torch.full((image_len,), self.language.image_token_id)
            rows.append(torch.cat([torch.tensor([BOS_TOKEN]), image, text]))
        input_ids = torch.stack(rows)
        labels = torch.roll(input_ids, -1, dims=1)
        loss_mask = (labels != self.language.image_token_id).float()  # no loss on image slots
        loss_mask[:, -1] = 0.0  # the last position has no next token
        position_ids = torch.arange(seq).expand(len(indices), seq).clone()
        return {"input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
                "position_ids": position_ids,
                "sample_index": torch.tensor(indices, dtype=torch.long)}


@dataclass(frozen=True)
class BranchSampler:
    """Which sample indices one DP rank of one branch reads at each micro-step.

    Pure arithmetic on (consumed samples, micro-step): resuming at any consumed-samples
    offset reproduces exactly the indices of the uninterrupted run.
    """

    job_micro_batch: int
    dp_size: int
    dp_rank: int

    def __post_init__(self) -> None:
        if self.job_micro_batch % self.dp_size:
            raise ValueError(f"micro-batch {self.job_micro_batch} does not split over dp {self.dp_size}")
        if not 0 <= self.dp_rank < self.dp_size:
            raise ValueError(f"dp_rank {self.dp_rank} outside dp size {self.dp_size}")

    @property
    def per_rank(self) -> int:
        """Samples this rank reads per micro-step."""
        return self.job_micro_batch // self.dp_size

    def indices(self, consumed_samples: int, micro_step: int, base: int = 0) -> list[int]:
        """Global sample indices of this rank for ``micro_step`` after ``consumed_samples``."""
        start = base + consumed_samples + micro_step * self.job_micro_batch + self.dp_rank * self.per_rank
        return list(range(start, start + self.per_rank))
