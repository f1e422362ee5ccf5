"""Energon sample types of this project's datasets, and the decoder that leaves clips alone.

Energon imports this module when a dataset's ``.nv-meta/dataset.yaml`` names it
(``__module__: megatron_mimo.data.energon_samples``), in the training process and in every
loader worker: it must stay importable without side effects.
"""

from __future__ import annotations

import torch
from megatron.energon import Sample, SampleDecoder, edataclass

AUDIO_EXTENSIONS = ("wav",)
"""Members :class:`RawAudioDecoder` hands over as bytes."""


@edataclass
class AudioCaptionSample(Sample):
    """An image, a clip and a caption with two answers: the word the image decides and the
    word the clip decides (``prepare-digits --audio``: "image seven tone three")."""

    #: The image tensor (C, H, W), decoded by Energon.
    image: torch.Tensor
    #: The clip as the WAV file's bytes (decoded by the task encoder, never by Energon); None:
    #: the sample has no clip.
    audio: bytes | None
    #: The caption.
    caption: str
    #: Index (from 0) of the whitespace-separated caption word the image decides.
    image_answer: int
    #: Index (from 0) of the caption word the clip decides.
    audio_answer: int


def _is_audio(member: str) -> bool:
    return any(member == ext or member.endswith(f".{ext}") for ext in AUDIO_EXTENSIONS)


class RawAudioDecoder(SampleDecoder):
    """Energon's default decoder, except that ``.wav`` members stay bytes.

    Energon would open a WAV with its ``AVDecoder``, which needs PyAV (not installed with
    ``megatron-mimo[data]``) and returns a lazy decoder, not samples. The task encoder reads the
    bytes itself (:func:`megatron_mimo.data.audio.read_wav`), with one error per bad file."""

    def __call__(self, sample: dict) -> dict:
        raw = {name: value for name, value in sample.items() if _is_audio(name)}
        decoded = super().__call__({k: v for k, v in sample.items() if k not in raw})
        return {**decoded, **raw}

    def config(self) -> dict:
        return {**super().config(), "raw_members": list(AUDIO_EXTENSIONS)}
