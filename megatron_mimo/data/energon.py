"""Energon loaders of image-caption samples (``CaptioningSample``), instruction samples
(``VQASample``, :mod:`megatron_mimo.data.vqa`) and image + clip samples (our
``AudioCaptionSample``, :mod:`megatron_mimo.data.energon_samples`): the task encoder and one
savable loader per *view*.

A view is one data-parallel reader of the dataset (``docs/data.md``): Energon's
``WorkerConfig(rank=view, world_size=num_views)`` with the job's ``--num-workers`` and seed. Which
views a rank runs is decided in :mod:`megatron_mimo.data.views` from the rank's own branch DP
rank and size; never from a global rank.

Every sample that fails to decode or tokenize raises (Energon's default handler logs and skips
up to 100 in a row): a training sample never vanishes silently. A clip is decoded here, not by
Energon (:class:`~megatron_mimo.data.energon_samples.RawAudioDecoder`): one error per bad WAV,
no PyAV needed.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from megatron_mimo.config.models import PIXEL_NORMS, AudioModelConfig
from megatron_mimo.data.audio import log_mel, read_wav, silence
from megatron_mimo.data.tokenizer import (
    CaptionTokenizer,
    SequenceLayout,
    WordTokenizer,
    word_token_index,
)
from megatron_mimo.data.vqa import TurnFormat, first_answer
from megatron_mimo.errors import DataError

logger = logging.getLogger(__name__)

SHUFFLE_BUFFER = 100
"""Samples Energon shuffles among (our digits are also shuffled when written)."""
MAX_SAMPLES_PER_SEQUENCE = 50
"""Longest run of consecutive samples of one shard a view reads before jumping elsewhere."""


def normalised_pixels(image: torch.Tensor, size: int, pixel_norm: str, what: str) -> torch.Tensor:
    """An RGB image ``[3, H, W]`` in [0, 1] as the encoder reads it: resized to ``size`` and
    normalised by :data:`PIXEL_NORMS` ``[pixel_norm]`` (training and generation share this)."""
    if image.ndim != 3 or image.shape[0] != 3:
        raise DataError(f"{what}: image of shape {tuple(image.shape)}, expected [3, H, W]")
    if image.shape[1:] != (size, size):
        image = F.interpolate(image[None].float(), size=(size, size), mode="bilinear",
                              antialias=True, align_corners=False)[0]
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in PIXEL_NORMS[pixel_norm])
    return (image.float() - mean) / std


@dataclass(frozen=True)
class SampleFormat:
    """How one image-caption or VQA sample becomes model inputs (the same for every view)."""

    image_size: int
    layout: SequenceLayout
    tokenizer: CaptionTokenizer
    pixel_norm: str = "half"
    """Key of :data:`PIXEL_NORMS`."""
    turn: TurnFormat = TurnFormat()
    """How a VQA sample's question and answer become text (the tokenizer's chat template)."""
    audio: AudioModelConfig | None = None
    """The audio encoder's sizes with an audio branch (then every sample has a clip's features
    and audio slots); None: no audio branch."""

    def pixels(self, image: torch.Tensor, key: str) -> torch.Tensor:
        """``[3, S, S]`` normalised; other sizes are resized (any dataset trains, not only ours)."""
        return normalised_pixels(image, self.image_size, self.pixel_norm, f"sample {key}")

    def features(self, wav: bytes | None, key: str) -> torch.Tensor:
        """``[num_mel_bins, max_frames]`` log-mel features of a WAV file's clip; no clip
        (None): the features of silence."""
        cfg = self._audio(key)
        return silence(cfg) if wav is None else log_mel(read_wav(wav, key, cfg.sample_rate),
                                                        cfg, key)

    def _audio(self, key: str) -> AudioModelConfig:
        if self.audio is None:
            raise DataError(f"sample {key}: an audio sample, but the job has no audio branch")
        return self.audio

    def _no_audio(self, key: str) -> None:
        """Samples without a clip cannot fill the audio slots of an audio job."""
        if self.audio is not None:
            raise DataError(f"sample {key}: the job has an audio branch but the sample has no "
                            f"clip (not an AudioCaptionSample)")

    def encode(self, key: str, image: torch.Tensor, caption: str) -> dict[str, Any]:
        """One sample's tensors, plus its key (what tests and logs identify it by)."""
        self._no_audio(key)
        ids, answer = self.tokenizer.encode_with_answer(caption, key)
        text = self.layout.build(ids, key, answer)
        return {"key": key, "pixels": self.pixels(image, key), **text}

    def encode_vqa(self, key: str, image: torch.Tensor, question: str,
                   answers: list[str] | str | None) -> dict[str, Any]:
        """One VQA sample's tensors: the loss covers only its (first) answer and EOS."""
        self._no_audio(key)
        prompt_ids, answer_ids = self.turn.split(self.tokenizer, question,
                                                 first_answer(answers, key), key)
        text = self.layout.build_turn(prompt_ids, answer_ids, key)
        return {"key": key, "pixels": self.pixels(image, key), **text}

    def encode_audio(self, key: str, image: torch.Tensor, wav: bytes | None, caption: str,
                     image_answer: int, audio_answer: int) -> dict[str, Any]:
        """One image + clip sample's tensors: pixels, the clip's features, and the caption
        after the image and audio slots; ``answer_position`` predicts the caption word
        ``image_answer`` (counted from 0), ``audio_answer_position`` the word ``audio_answer``."""
        features = self.features(wav, key)
        for name, value in (("image_answer", image_answer), ("audio_answer", audio_answer)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise DataError(f"sample {key}: {name} {value!r} is not a word index")
        ids, image_index = word_token_index(self.tokenizer, caption, image_answer, key)
        _, audio_index = word_token_index(self.tokenizer, caption, audio_answer, key, ids)
        text = self.layout.build(ids, key, image_index, audio_index)
        return {"key": key, "pixels": self.pixels(image, key), "audio": features, **text}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack every tensor field (Energon's batching never stacks); the keys become a list."""
    tensors = {name: torch.stack([s[name] for s in samples]) for name in samples[0] if name != "key"}
    return {"keys": [s["key"] for s in samples], **tensors}


def _task_encoder_class():
    """Built on first use: Energon is an optional dependency and slow to import."""
    from megatron.energon import DefaultTaskEncoder, VQASample

    from megatron_mimo.data.energon_samples import AudioCaptionSample, RawAudioDecoder

    class ImageCaptionEncoder(DefaultTaskEncoder):
        """CaptioningSample, VQASample or AudioCaptionSample (what ``.nv-meta/dataset.yaml``
        declares) -> tensors; batches are plain dicts."""

        def __init__(self, sample_format: SampleFormat) -> None:
            super().__init__()
            self.sample_format = sample_format
            if sample_format.audio is not None:  # clips reach encode_sample as WAV bytes
                self.decoder = RawAudioDecoder()

        def encode_sample(self, sample):  # noqa: D102 - Energon's hook
            if isinstance(sample, AudioCaptionSample):
                return self.sample_format.encode_audio(
                    sample.__key__, sample.image, sample.audio, sample.caption,
                    sample.image_answer, sample.audio_answer)
            if isinstance(sample, VQASample):
                return self.sample_format.encode_vqa(sample.__key__, sample.image,
                                                     sample.context, sample.answers)
            return self.sample_format.encode(sample.__key__, sample.image, sample.caption)

        def batch(self, samples):  # noqa: D102 - Energon's hook
            return collate(samples)

    return ImageCaptionEncoder


def import_energon():
    """Energon's module, or a DataError naming the extra to install."""
    try:
        import megatron.energon as energon
    except ImportError as error:
        raise DataError("--data-path needs megatron-energon: pip install "
                        "'megatron-mimo[data]'") from error
    return energon


@dataclass(frozen=True)
class ViewSpec:
    """One Energon reader: which of ``num_views`` readers, and how it reads."""

    path: Path
    view: int
    num_views: int
    num_workers: int
    seed: int
    batch_size: int

    def worker_config(self):
        """Energon's WorkerConfig of this view; errors re-raise instead of skipping samples."""
        energon = import_energon()
        from megatron.energon.errors import reraise_exception

        return energon.WorkerConfig(rank=self.view, world_size=self.num_views,
                                    num_workers=self.num_workers, seed_offset=self.seed,
                                    global_error_handler=reraise_exception)


def build_train_loader(spec: ViewSpec, sample_format: SampleFormat):
    """Endless shuffled savable loader over the ``train`` split (Energon repeats epochs)."""
    energon = import_energon()
    dataset = energon.get_train_dataset(
        str(spec.path), split_part="train", worker_config=spec.worker_config(),
        batch_size=spec.batch_size, shuffle_buffer_size=SHUFFLE_BUFFER,
        max_samples_per_sequence=MAX_SAMPLES_PER_SEQUENCE,
        task_encoder=_task_encoder_class()(sample_format))
    return _own_generator(energon.get_savable_loader(dataset), spec)


def build_val_loader(spec: ViewSpec, sample_format: SampleFormat):
    """One in-order pass over the ``val`` split (a fresh loader per evaluation: same samples).

    It must leave the process's garbage-collector freeze alone. Energon's ``get_loader`` builds
    an in-process loader that calls ``gc.freeze()`` when its pass starts and ``gc.unfreeze()``
    when it ends; the freeze is process-wide, so such a val pass would unfreeze everything the
    training loader froze, and every later full collection would walk the whole heap again
    (training slows down after each evaluation). Hence ``gc_freeze_at_start=False``; pinned by
    ``tests/unit/test_energon_data.py`` (the freeze count survives a val pass)."""
    energon = import_energon()
    from megatron.energon.savable_loader import BasicDataLoader

    dataset = energon.get_val_dataset(
        str(spec.path), split_part="val", worker_config=spec.worker_config(),
        batch_size=spec.batch_size, task_encoder=_task_encoder_class()(sample_format))
    return _own_generator(BasicDataLoader(dataset, gc_freeze_at_start=False), spec)


def _own_generator(loader, spec: ViewSpec):
    """torch's DataLoader draws a base seed from the global torch RNG whenever an iterator
    starts; with its own generator, the training RNG streams (dropout) do not depend on when a
    loader started, so a resumed run draws exactly what the uninterrupted one drew."""
    loader.generator = torch.Generator().manual_seed(spec.seed * 1009 + spec.view)
    return loader


def sample_format_for(path: Path, image_size: int, seq_length: int, num_image_tokens: int,
                      image_token_id: int, tokenizer_model: str | None = None,
                      vocab_size: int | None = None, pixel_norm: str = "half",
                      audio: AudioModelConfig | None = None,
                      audio_token_id: int | None = None) -> SampleFormat:
    """The captions' tokenizer checked against the language vocabulary: the Hugging Face one
    of ``tokenizer_model`` (``--tokenizer-model``) if given, else the dataset's word list; VQA
    samples use its chat template (none: the built-in default, :mod:`megatron_mimo.data.vqa`).

    ``vocab_size`` is the model's (None: ``image_token_id + 1``, the placeholder is the last id).
    ``audio`` (with an audio branch): every sample gets a clip's features and
    ``audio.num_audio_tokens`` slots of ``audio_token_id`` after the image's.
    """
    if audio is not None and audio_token_id is None:
        raise ValueError("an audio sample format needs the model's audio token id")
    tokenizer: CaptionTokenizer
    if tokenizer_model is None:
        tokenizer = WordTokenizer.load(path)
        reserved = image_token_id if audio is None else min(image_token_id, audio_token_id)
        if tokenizer.vocab_size > reserved:  # the words' ids must not be a placeholder's
            why = (f"(--vocab-size {image_token_id + 1})" if audio is None else
                   f"for the image and audio placeholders (--image-token-id {image_token_id}, "
                   f"--audio-token-id {audio_token_id})")
            raise DataError(f"{Path(path) / 'tokenizer.json'} has {tokenizer.vocab_size} words "
                            f"but ids from {reserved} up are reserved {why}: raise --vocab-size")
    else:
        from megatron_mimo.data.hf_tokenizer import HFTokenizer

        tokenizer = HFTokenizer.load(tokenizer_model)
        tokenizer.check_model(image_token_id,
                              image_token_id + 1 if vocab_size is None else vocab_size)
        if audio is not None:
            tokenizer.check_audio_token(audio_token_id)
    layout = SequenceLayout.for_tokenizer(tokenizer, seq_length, num_image_tokens, image_token_id,
                                          0 if audio is None else audio.num_audio_tokens,
                                          audio_token_id)
    return SampleFormat(image_size, layout, tokenizer, pixel_norm,
                        TurnFormat.for_tokenizer(tokenizer), audio)


def start_loaders(loaders: list) -> list:
    """Iterators of ``loaders``; worker processes (if any) are forked here.

    Energon's workers call ``gc.collect()`` first thing; any garbage the training process had
    not collected yet (cycles around process groups, say) would then be finalised in the child,
    where its resources are not valid (the worker segfaults). Collecting in this process and
    freezing what is left across the fork keeps inherited objects out of the child's
    collections."""
    gc.collect()
    gc.freeze()
    try:
        return [iter(loader) for loader in loaders]
    finally:
        gc.unfreeze()


def close_loaders(loaders: list) -> None:
    """Stop the loaders' worker processes now, in a fraction of a second.

    Dropped as they are, each worker of a used loader outlives its loader by torch's join
    timeout: Energon's per-worker command thread waits on its queue, so the worker does not exit
    and torch's shutdown waits out the timeout before terminating it. A ``None`` command ends
    that thread; then torch's own shutdown joins at once."""
    for loader in loaders:
        for queue in getattr(loader, "cmd_queues", []):
            queue.put((None,))
        iterator = getattr(loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
            loader._iterator = None


def next_batch(loader_iter, spec: ViewSpec) -> dict[str, Any]:
    """The next batch of a view; any loader failure becomes a DataError naming the view."""
    try:
        return next(loader_iter)
    except StopIteration:
        raise DataError(f"{spec.path}: view {spec.view} of {spec.num_views} ran out of samples "
                        f"(batch {spec.batch_size}); the split is too small for this run") from None
    except DataError:
        raise
    except Exception as error:  # noqa: BLE001 - decode/read failures carry the sample in the text
        raise DataError(f"{spec.path}: view {spec.view} of {spec.num_views} failed to read a "
                        f"sample: {describe_failure(error)}") from error


def describe_failure(error: BaseException) -> str:
    """One line: the sample and file of a decoding error (webdataset keeps them as attributes
    with an empty message) and every cause in the chain."""
    parts, seen = [], error
    while seen is not None:
        where = [f"{name} {getattr(seen, name)}" for name in ("key", "k", "url")
                 if getattr(seen, name, None)]
        text = " ".join(str(seen).split())[:200]
        parts.append(f"{type(seen).__name__}" + (f" ({', '.join(where)})" if where else "")
                     + (f": {text}" if text else ""))
        seen = seen.__cause__ or seen.__context__
    return " <- ".join(parts)
