"""Audio clips for the audio branch: telephone tones, 16-bit WAV files, Whisper-style log-mel
features (numpy and torch only: no torchaudio, no av).

Why telephone (DTMF) tones: a keypad digit is two sine waves, one of four *row* frequencies and
one of three *column* frequencies, so a clip names its digit by where its energy sits in the
spectrum. A caption word that only the tone decides then proves the clip reaches the language
model, as the digit images do for the image branch.

Features (:func:`log_mel`), as Whisper computes them, at the sizes of
:class:`~megatron_mimo.config.models.AudioModelConfig`:

- ``torch.stft`` with a periodic Hann window of ``n_fft``, ``hop_length``, ``center=True``; the
  centring pads with zeros (Whisper reflects): a clip is surrounded by silence, and a clip
  shorter than half a window still has frames. A clip of ``L`` samples has ``1 + L // hop``
  frames, so ``cfg.max_samples`` is the longest that fits ``max_frames``.
- power spectrum through a triangular mel filterbank on the **HTK** mel scale
  (``2595 log10(1 + f / 700)``, no area normalisation: torchaudio's
  ``melscale_fbanks(norm=None, mel_scale="htk")``), from 0 Hz to the Nyquist frequency;
- ``log10`` with a floor of :data:`LOG_FLOOR`, clamped to ``max - 8`` over the clip, then
  ``(x + 4) / 4``;
- frames after the clip are :func:`silence`'s frames (the features of an all-zero clip), so
  every sample has ``max_frames`` frames and every micro-batch the same shape.
"""

from __future__ import annotations

import functools
import io
import math
import wave

import numpy as np
import torch

from megatron_mimo.config.models import AudioModelConfig
from megatron_mimo.errors import DataError

DTMF_ROWS = (697.0, 770.0, 852.0, 941.0)
"""Row frequencies (Hz) of the telephone keypad, top to bottom."""
DTMF_COLUMNS = (1209.0, 1336.0, 1477.0)
"""Column frequencies (Hz), left to right (the fourth column, A-D, is not on phones)."""
KEYPAD = ("123", "456", "789", "*0#")
"""Keys by row and column: digit ``d`` sounds its row's and its column's frequency."""
TONE_AMPLITUDE = 0.4
"""Peak of each of the two sines: together at most 0.8, headroom for the noise in 16 bits."""
LOG_FLOOR = 1e-10
"""Smallest mel power before ``log10`` (Whisper's): silence is ``log10(1e-10) = -10``."""
DYNAMIC_RANGE = 8.0
"""Whisper keeps 8 decades below the loudest value of a clip (80 dB)."""
PCM_SCALE = 32768.0
"""16-bit PCM full scale: a sample ``s`` reads as ``s / 32768``, in [-1, 1)."""


def dtmf_frequencies(digit: int) -> tuple[float, float]:
    """(row, column) frequency in Hz of keypad digit ``digit`` (0-9)."""
    if not 0 <= digit <= 9:
        raise ValueError(f"a keypad digit lies in 0..9, got {digit}")
    row = next(r for r, keys in enumerate(KEYPAD) if str(digit) in keys)
    return DTMF_ROWS[row], DTMF_COLUMNS[KEYPAD[row].index(str(digit))]


def dtmf(digit: int, sample_rate: int, samples: int, rng: np.random.Generator,
         noise: float) -> np.ndarray:
    """``samples`` samples of digit ``digit``'s two-tone signal plus Gaussian noise of standard
    deviation ``noise``; the two phases are drawn from ``rng`` (as is the noise): the same
    generator state gives the same clip."""
    row, column = dtmf_frequencies(digit)
    if 2 * column >= sample_rate:
        raise DataError(f"a sample rate of {sample_rate} Hz cannot carry the {column:g} Hz tone "
                        f"of digit {digit} (it needs more than {2 * column:g} Hz)")
    t = np.arange(samples, dtype=np.float64) / sample_rate
    phases = rng.uniform(0.0, 2 * math.pi, size=2)
    tone = (np.sin(2 * math.pi * row * t + phases[0])
            + np.sin(2 * math.pi * column * t + phases[1])) * TONE_AMPLITUDE
    return (tone + rng.normal(0.0, noise, size=samples)).astype(np.float32)


def wav_bytes(waveform: np.ndarray | torch.Tensor, sample_rate: int) -> bytes:
    """A mono 16-bit PCM WAV file of ``waveform`` (values in [-1, 1]; beyond is clipped)."""
    values = np.asarray(waveform, dtype=np.float64).reshape(-1)
    pcm = np.round(np.clip(values, -1.0, 1.0) * (PCM_SCALE - 1)).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(pcm.tobytes())
    return out.getvalue()


def read_wav(data: bytes, key: str, sample_rate: int) -> torch.Tensor:
    """The samples of a mono 16-bit PCM WAV file as float32 in [-1, 1].

    Anything else is one DataError naming the sample: a clip at another rate would be read at
    the wrong pitch (and a DTMF digit is its pitch), a stereo clip would interleave channels."""
    try:
        with wave.open(io.BytesIO(data), "rb") as wav:
            channels, width = wav.getnchannels(), wav.getsampwidth()
            rate, frames = wav.getframerate(), wav.getnframes()
            raw = wav.readframes(frames)
    except (wave.Error, EOFError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise DataError(f"sample {key}: cannot decode its WAV file ({reason}); expected mono "
                        f"16-bit PCM") from None
    if channels != 1:
        raise DataError(f"sample {key}: its WAV file has {channels} channels, the audio encoder "
                        f"reads mono")
    if width != 2:
        raise DataError(f"sample {key}: its WAV file holds {8 * width}-bit samples, only 16-bit "
                        f"PCM is read")
    if rate != sample_rate:
        raise DataError(f"sample {key}: its WAV file is sampled at {rate} Hz, the audio encoder "
                        f"reads {sample_rate} Hz (--audio-sample-rate): resample the clip")
    if len(raw) != 2 * frames:
        raise DataError(f"sample {key}: its WAV file is truncated ({len(raw) // 2} of {frames} "
                        f"samples)")
    return torch.from_numpy(np.frombuffer(raw, dtype="<i2").astype(np.float32) / PCM_SCALE)


def hz_to_mel(hz: torch.Tensor) -> torch.Tensor:
    """HTK mel scale."""
    return 2595.0 * torch.log10(1.0 + hz / 700.0)


def mel_to_hz(mel: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`hz_to_mel`."""
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


@functools.lru_cache(maxsize=8)
def mel_filterbank(sample_rate: int, n_fft: int, num_mel_bins: int) -> torch.Tensor:
    """``[num_mel_bins, n_fft // 2 + 1]`` triangles, equally spaced on the HTK mel scale from
    0 Hz to the Nyquist frequency, each rising from its left neighbour's centre to 1 at its own
    and falling to its right neighbour's (computed in float64, returned in float32; cached per
    size, never modified)."""
    bins = torch.linspace(0.0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    edges = mel_to_hz(torch.linspace(0.0, float(hz_to_mel(torch.tensor(sample_rate / 2.0))),
                                     num_mel_bins + 2, dtype=torch.float64))
    lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins[None] - lower) / (centre - lower)
    falling = (upper - bins[None]) / (upper - centre)
    return torch.minimum(rising, falling).clamp(min=0.0).float()


def mel_band_of(frequency: float, cfg: AudioModelConfig) -> int:
    """The mel band whose triangle weighs ``frequency`` most (where a pure tone's energy peaks)."""
    centres = mel_to_hz(torch.linspace(0.0, float(hz_to_mel(torch.tensor(cfg.sample_rate / 2.0))),
                                       cfg.num_mel_bins + 2, dtype=torch.float64))[1:-1]
    return int((centres - frequency).abs().argmin())


def _whisper_normalise(log_spec: torch.Tensor) -> torch.Tensor:
    """Whisper's scaling of ``log10`` mel power: at most 8 decades below the clip's maximum,
    then ``(x + 4) / 4`` (roughly [-1, 1] for speech)."""
    log_spec = torch.maximum(log_spec, log_spec.max() - DYNAMIC_RANGE)
    return (log_spec + 4.0) / 4.0


def silence(cfg: AudioModelConfig) -> torch.Tensor:
    """``[num_mel_bins, max_frames]``: the features of an all-zero clip (every mel power at the
    floor). What ``--blank-audio`` feeds, what a sample without a clip gets, and what pads every
    clip on the right."""
    floor = torch.full((cfg.num_mel_bins, cfg.max_frames), LOG_FLOOR, dtype=torch.float32)
    return _whisper_normalise(floor.log10())


def num_frames(samples: int, cfg: AudioModelConfig) -> int:
    """STFT frames of a clip of ``samples`` samples (``center=True``)."""
    return 1 + samples // cfg.hop_length if samples else 0


def log_mel(waveform: torch.Tensor, cfg: AudioModelConfig, key: str) -> torch.Tensor:
    """``[num_mel_bins, max_frames]`` log-mel features of a mono clip (module docstring).

    A clip longer than ``cfg.max_samples`` is a DataError naming the sample: cutting it would
    silently drop what may decide its caption."""
    if waveform.ndim != 1:
        raise DataError(f"sample {key}: a clip of shape {tuple(waveform.shape)}, expected one "
                        f"channel of samples")
    samples = waveform.numel()
    if samples > cfg.max_samples:
        raise DataError(
            f"sample {key}: clip of {samples} samples ({samples / cfg.sample_rate:.3f} s) is "
            f"longer than the audio encoder's maximum of {cfg.max_samples} samples "
            f"({cfg.max_samples / cfg.sample_rate:.3f} s = --audio-max-frames {cfg.max_frames} "
            f"at hop {cfg.hop_length}, {cfg.sample_rate} Hz): raise --audio-max-frames or "
            f"shorten the clip")
    features = silence(cfg)
    if samples == 0:
        return features
    spectrum = torch.stft(waveform.float(), cfg.n_fft, cfg.hop_length,
                          window=torch.hann_window(cfg.n_fft), center=True,
                          pad_mode="constant", return_complex=True)
    power = spectrum.abs() ** 2  # [n_fft // 2 + 1, frames]
    mel = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.num_mel_bins) @ power
    clip = _whisper_normalise(mel.clamp(min=LOG_FLOOR).log10())
    features[:, :clip.shape[1]] = clip
    return features
