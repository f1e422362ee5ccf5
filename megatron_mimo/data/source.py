"""One rank's training data: the micro-batches of each global batch, evaluation batches, and the
per-rank state a checkpoint keeps.

Two sources behind one interface (:class:`BranchData`):

- :class:`MockSource` (no ``--data-path``): deterministic mock samples picked by index
  arithmetic (:mod:`megatron_mimo.data.sampler`); its state is the consumed-sample count.
- :class:`EnergonSource` (``--data-path DIR``): Energon savable loaders, one per view this rank
  runs (:mod:`megatron_mimo.data.views`); its state is every loader's own state, as plain
  types, with the record it must match on resume (:mod:`megatron_mimo.data.loader_state`).

A rank gets only what its branch needs: images ranks pixels, audio ranks the clips' log-mel
features (with an audio branch), language ranks the text tensors (:func:`text_fields`); every
rank gets the sample keys, which is how tests prove all branches read the same samples.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from megatron_mimo.config.layout import AUDIO, IMAGES
from megatron_mimo.config.schema import MimoConfig
from megatron_mimo.data.mock import EVAL_INDEX_BASE, MockImageText
from megatron_mimo.data.sampler import BranchSampler, DataPosition
from megatron_mimo.data.views import assign_branch_views
from megatron_mimo.errors import DataError

logger = logging.getLogger(__name__)

TEXT_FIELDS = ("input_ids", "labels", "loss_mask", "position_ids", "answer_position")
"""What a language rank reads of a sample (without an audio branch)."""
AUDIO_ANSWER_FIELD = "audio_answer_position"
"""With an audio branch, also this: the position whose label is the word the clip decides."""

Batch = dict[str, Any]


def text_fields(branches: tuple[str, ...]) -> tuple[str, ...]:
    """What a language rank reads of a sample in a job with ``branches`` (``cfg.branches``)."""
    return TEXT_FIELDS + ((AUDIO_ANSWER_FIELD,) if AUDIO in branches else ())


class BranchData:
    """Reads this rank's part of every global batch, in order; subclasses say how."""

    def __init__(self, branch: str, num_microbatches: int, global_batch_size: int,
                 blank_images: bool, blank_audio: bool = False,
                 silence: torch.Tensor | None = None,
                 text_fields: tuple[str, ...] = TEXT_FIELDS) -> None:
        self.branch, self.num_microbatches = branch, num_microbatches
        self.global_batch_size, self.blank_images = global_batch_size, blank_images
        # silence: one clip's features of silence, [num_mel_bins, max_frames] (--blank-audio)
        self.blank_audio, self.silence, self.text_fields = blank_audio, silence, text_fields
        if blank_audio and silence is None:
            raise ValueError("blank_audio needs the features of silence")
        self.last_keys: list[list[str]] = []
        """Sample keys of each micro-batch of the last global batch this rank read."""

    consumed_samples: int

    def _read_micro_batch(self, micro_step: int) -> Batch:
        raise NotImplementedError

    def _advance(self) -> None:
        raise NotImplementedError

    def select(self, batch: Batch) -> Batch:
        """What this rank's branch uses of a full batch (``--blank-images`` zeroes pixels here,
        ``--blank-audio`` replaces every clip by silence)."""
        if self.branch == IMAGES:
            pixels = batch["pixels"]
            return {"keys": batch["keys"],
                    "pixels": torch.zeros_like(pixels) if self.blank_images else pixels}
        if self.branch == AUDIO:
            audio = batch["audio"]
            return {"keys": batch["keys"],
                    "audio": self.silence.expand_as(audio).clone() if self.blank_audio else audio}
        return {"keys": batch["keys"], **{name: batch[name] for name in self.text_fields}}

    def next_global_batch(self) -> list[Batch]:
        """This rank's micro-batches of the next global batch; the position advances."""
        batches = [self.select(self._read_micro_batch(m)) for m in range(self.num_microbatches)]
        self._advance()
        self.last_keys = [b["keys"] for b in batches]
        return batches

    def eval_batches(self, eval_iters: int) -> Iterator[list[Batch]]:
        """The same held-out global batches at every evaluation (the training position stays)."""
        raise NotImplementedError

    def restart_at(self, consumed_samples: int) -> None:
        """Continue at ``consumed_samples`` without a saved state of this rank (layout changed)."""
        raise NotImplementedError

    def close(self) -> None:
        """Release loader processes."""


class MockSource(BranchData):
    """Mock samples: the sampler's indices after the consumed-sample count."""

    def __init__(self, dataset: MockImageText, sampler: BranchSampler, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.dataset, self.sampler, self.position = dataset, sampler, DataPosition()

    @property
    def consumed_samples(self) -> int:
        """Samples the job consumed so far."""
        return self.position.consumed_samples

    def _batch(self, indices: list[int]) -> Batch:
        batch = {"keys": [str(i) for i in indices]}
        if self.branch == IMAGES:
            return {**batch, "pixels": self.dataset.pixels(indices)}
        if self.branch == AUDIO:
            return {**batch, "audio": self.dataset.audio(indices)}
        return {**batch, **self.dataset.tokens(indices)}

    def _read_micro_batch(self, micro_step: int) -> Batch:
        return self._batch(self.sampler.indices(self.consumed_samples, micro_step))

    def _advance(self) -> None:
        self.position.advance(self.global_batch_size)

    def upcoming_indices(self) -> list[int]:
        """Indices of this rank's next micro-batch (pure arithmetic; nothing is read)."""
        return self.sampler.indices(self.consumed_samples, 0)

    def eval_batches(self, eval_iters: int) -> Iterator[list[Batch]]:
        for batch in range(eval_iters):
            consumed = batch * self.global_batch_size
            yield [self.select(self._batch(self.sampler.indices(consumed, m, base=EVAL_INDEX_BASE)))
                   for m in range(self.num_microbatches)]

    def state_dict(self) -> dict[str, Any]:
        """The consumed-sample count."""
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved count (a real-data checkpoint is refused: other samples)."""
        if "record" in state:
            raise DataError(f"the checkpoint was trained on --data-path "
                            f"{state['record']['data_path']}: resume with it (or use --finetune)")
        self.position.load_state_dict(state)

    def restart_at(self, consumed_samples: int) -> None:
        self.position.consumed_samples = consumed_samples


def concat(batches: list[Batch]) -> Batch:
    """Views' batches of one micro-step, in view order."""
    if len(batches) == 1:
        return batches[0]
    return {name: (sum((b[name] for b in batches), []) if name == "keys"
                   else torch.cat([b[name] for b in batches])) for name in batches[0]}


class EnergonSource(BranchData):
    """Energon savable loaders, one per view of this rank, read in lock step."""

    def __init__(self, views: list, sample_format, record, where: str, val_samples: int = 0,
                 **kwargs: Any) -> None:
        from megatron_mimo.data.energon import build_train_loader

        super().__init__(**kwargs)
        self.views, self.sample_format, self.record, self.where = views, sample_format, record, where
        self.val_samples = val_samples
        """Samples of the val split (0: unknown, not checked)."""
        self.loaders = [build_train_loader(view, sample_format) for view in views]
        self._iterators: list | None = None
        self.consumed_samples = 0

    def _read_micro_batch(self, micro_step: int) -> Batch:
        from megatron_mimo.data.energon import next_batch, start_loaders

        if self._iterators is None:
            self._iterators = start_loaders(self.loaders)
        return concat([next_batch(it, view) for it, view in zip(self._iterators, self.views,
                                                                 strict=True)])

    def _advance(self) -> None:
        self.consumed_samples += self.global_batch_size

    def eval_batches(self, eval_iters: int) -> Iterator[list[Batch]]:
        """A fresh in-process val loader per view (``num_workers`` 0: a partly read loader with
        worker processes takes seconds to shut down)."""
        from dataclasses import replace

        from megatron_mimo.data.energon import build_val_loader, next_batch

        self._check_eval_fits(eval_iters)
        views = [replace(view, num_workers=0) for view in self.views]
        iterators = [iter(build_val_loader(view, self.sample_format)) for view in views]
        for _ in range(eval_iters):
            yield [self.select(concat([next_batch(it, v) for it, v in zip(iterators, views,
                                                                          strict=True)]))
                   for _ in range(self.num_microbatches)]

    def _check_eval_fits(self, eval_iters: int) -> None:
        """Every view must hold the evaluation's samples, or ranks would stop at different
        batches (and wait for each other forever); every rank decides the same."""
        need = eval_iters * self.global_batch_size
        num_views = self.record.num_views
        if self.val_samples and self.val_samples // num_views * num_views < need:
            raise DataError(f"--eval-iters {eval_iters} x --global-batch-size "
                            f"{self.global_batch_size} = {need} held-out samples, the val split "
                            f"of {self.record.data_path} has {self.val_samples} over {num_views} "
                            f"readers: lower --eval-iters")

    def state_dict(self) -> dict[str, Any]:
        """Consumed samples, the record and each view's loader state (plain types)."""
        from megatron_mimo.data.loader_state import to_plain

        return {"consumed_samples": self.consumed_samples, "record": self.record.as_dict(),
                "views": [to_plain(loader.save_state_rank()) for loader in self.loaders]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Check the record, then restore every view (before the first batch is read)."""
        from megatron_mimo.data.loader_state import from_plain

        if "record" not in state:
            raise DataError(f"{self.where}: the checkpoint holds no data loader state (saved "
                            f"without --data-path): resume without it, or use --finetune")
        self.record.check_saved(state["record"], self.where)
        if self._iterators is not None:
            raise DataError(f"{self.where}: loader state restored after reading started")
        for loader, saved in zip(self.loaders, state["views"], strict=True):
            loader.restore_state_rank(from_plain(saved))
        self.consumed_samples = int(state["consumed_samples"])

    def restart_at(self, consumed_samples: int) -> None:
        if consumed_samples:
            raise DataError(f"{self.where}: the layout changed since the checkpoint, so its "
                            f"per-rank data loader state cannot be used, and an Energon loader "
                            f"cannot skip to sample {consumed_samples}: resume with the saved "
                            f"layout, or use --finetune")

    def close(self) -> None:
        from megatron_mimo.data.energon import close_loaders

        close_loaders(self.loaders)
        self._iterators = None
        self.loaders = []


def build_branch_data(cfg: MimoConfig, branch: str, dp_rank: int) -> BranchData:
    """This rank's data: Energon views with --data-path, mock samples without."""
    dp_size = cfg.parallel(branch).dp
    audio = cfg.audio_model
    common = {"branch": branch, "num_microbatches": cfg.num_microbatches,
              "global_batch_size": cfg.training.global_batch_size,
              "blank_images": cfg.data.blank_images, "blank_audio": cfg.data.blank_audio,
              "text_fields": text_fields(cfg.branches)}
    if audio is not None:
        from megatron_mimo.data.audio import silence

        common["silence"] = silence(audio)
    if not cfg.data.data_path:
        sampler = BranchSampler(cfg.job_micro_batch, dp_size, dp_rank)
        dataset = MockImageText(cfg.images, cfg.language, cfg.training.seed, audio=audio)
        return MockSource(dataset, sampler, **common)
    return build_energon_source(cfg, branch, dp_rank, common)


def tokenizer_checksum(tokenizer_model: str | None) -> str:
    """xxh3 of the HF tokenizer's tokenizer.json; '' without one."""
    if not tokenizer_model:
        return ""
    from megatron_mimo.checkpoint.integrity import file_checksum
    from megatron_mimo.data.hf_tokenizer import TOKENIZER_FILE

    return file_checksum(Path(tokenizer_model) / TOKENIZER_FILE)["xxh3_128"]


def build_energon_source(cfg: MimoConfig, branch: str, dp_rank: int,
                         common: dict[str, Any]) -> EnergonSource:
    """Check the dataset folder, then one loader per view this rank runs."""
    from megatron_mimo.data.checks import check_dataset, check_sample_kind, split_size
    from megatron_mimo.data.energon import ViewSpec, sample_format_for
    from megatron_mimo.data.loader_state import LoaderRecord

    path = Path(cfg.data.data_path).resolve()
    check_dataset(path)
    audio = cfg.audio_model
    check_sample_kind(path, audio=audio is not None)
    # every branch's DP sizes: each DP rank of each branch reads its slice in bridge order
    assignment = assign_branch_views(cfg.job_micro_batch,
                                     {b: cfg.parallel(b).dp for b in cfg.branches},
                                     cfg.parallel(branch).dp, dp_rank)
    sample_format = sample_format_for(path, cfg.images.image_size, cfg.language.seq_length,
                                      cfg.images.num_image_tokens, cfg.language.image_token_id,
                                      cfg.data.tokenizer_model, cfg.language.vocab_size,
                                      cfg.images.pixel_norm, audio,
                                      cfg.language.audio_token_id if audio else None)
    seed, workers = cfg.training.seed, cfg.data.num_workers
    views = [ViewSpec(path, v, assignment.num_views, workers, seed, assignment.batch_size)
             for v in assignment.views]
    record = LoaderRecord(str(path), assignment.num_views, assignment.views, workers, seed,
                          assignment.batch_size, tokenizer_checksum(cfg.data.tokenizer_model))
    return EnergonSource(views, sample_format, record, where=f"{branch} DP rank {dp_rank}",
                         val_samples=split_size(path, "val"), **common)
