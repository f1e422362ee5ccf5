"""The audio branch's inputs without Energon: DTMF tones, WAV files, log-mel features
(``megatron_mimo/data/audio.py``, ``docs/data.md`` "Audio")."""

from __future__ import annotations

import io
import wave

import numpy as np
import pytest
import torch

from megatron_mimo.config.models import AudioModelConfig
from megatron_mimo.data.audio import (
    DTMF_COLUMNS,
    DTMF_ROWS,
    dtmf,
    dtmf_frequencies,
    log_mel,
    mel_band_of,
    num_frames,
    read_wav,
    silence,
    wav_bytes,
)
from megatron_mimo.errors import DataError

CFG = AudioModelConfig()
"""The default encoder: 8 kHz, 32 mel bands, 32 frames of hop 128 (3,968 samples)."""
PEAK_TOLERANCE = 0.02
"""A tone between two band centres splits its energy between them: its band may trail the
region's maximum by this much (the 1336 Hz column lies midway between two centres)."""
OTHER_MARGIN = 0.03
"""Every key frequency the digit does not sound stays at least this far below its own band."""


def tone(digit: int, samples: int = 2000, seed: int = 0, noise: float = 0.05) -> torch.Tensor:
    return torch.from_numpy(dtmf(digit, CFG.sample_rate, samples, np.random.default_rng(seed),
                                 noise))


def band_energy(digit: int, samples: int, seed: int) -> torch.Tensor:
    """Mean features of the clip's frames per mel band (the padding left out)."""
    return log_mel(tone(digit, samples, seed), CFG, "k")[:, :num_frames(samples, CFG)].mean(1)


def test_the_keypad_layout():
    assert dtmf_frequencies(1) == (697.0, 1209.0) and dtmf_frequencies(0) == (941.0, 1336.0)
    assert dtmf_frequencies(9) == (852.0, 1477.0) and dtmf_frequencies(5) == (770.0, 1336.0)
    assert len({dtmf_frequencies(d) for d in range(10)}) == 10
    with pytest.raises(ValueError, match="0..9"):
        dtmf_frequencies(10)


@pytest.mark.parametrize("samples, seed", [(800, 0), (CFG.max_samples, 1)])
def test_each_digit_peaks_in_the_bands_of_its_two_frequencies_and_no_other(samples, seed):
    bands = {f: mel_band_of(f, CFG) for f in DTMF_ROWS + DTMF_COLUMNS}
    assert len(set(bands.values())) == 7  # every key frequency has a band of its own
    split = (bands[DTMF_ROWS[-1]] + bands[DTMF_COLUMNS[0]] + 1) // 2  # rows below, columns above
    for digit in range(10):
        energy = band_energy(digit, samples, seed)
        row, column = dtmf_frequencies(digit)
        assert int(energy[:split].argmax()) == bands[row], digit
        assert energy[bands[column]] >= energy[split:].max() - PEAK_TOLERANCE, digit
        own = {row: bands[row], column: bands[column]}
        for other, band in bands.items():
            if other not in own:
                region_peak = own[row] if other in DTMF_ROWS else own[column]
                assert energy[band] < energy[region_peak] - OTHER_MARGIN, (digit, other)


def test_padding_and_silence_are_the_features_of_an_all_zero_clip():
    quiet = silence(CFG)
    assert quiet.shape == (CFG.num_mel_bins, CFG.max_frames) and quiet.dtype == torch.float32
    assert torch.equal(quiet, torch.full_like(quiet, -1.5))  # (log10(1e-10) + 4) / 4
    for samples in (0, 1, 500, CFG.max_samples):
        assert torch.equal(log_mel(torch.zeros(samples), CFG, "k"), quiet)
    features = log_mel(tone(3, 1000), CFG, "k")
    used = num_frames(1000, CFG)
    assert features.shape == quiet.shape and used == 8
    assert torch.equal(features[:, used:], quiet[:, used:])  # right padding: silence
    assert (features[:, :used] > -1.0).all()  # the clip's frames: its floor is max - 8 decades
    full = log_mel(tone(3, CFG.max_samples), CFG, "k")
    assert not (full == -1.5).all(dim=0).any()  # the longest clip fills every frame


def test_a_clip_longer_than_the_encoder_takes_is_one_line_naming_it():
    log_mel(torch.zeros(CFG.max_samples), CFG, "k")
    with pytest.raises(DataError) as error:
        log_mel(torch.zeros(CFG.max_samples + 1), CFG, "digit0042")
    message = str(error.value)
    assert "\n" not in message
    for part in ("sample digit0042", "3969 samples (0.496 s)", "maximum of 3968 samples",
                 "--audio-max-frames 32"):
        assert part in message, part


def test_wav_round_trip_is_16_bit_pcm():
    clip = tone(7, 1234, noise=0.0)
    data = wav_bytes(clip.numpy(), CFG.sample_rate)
    with wave.open(io.BytesIO(data)) as wav:
        assert (wav.getnchannels(), wav.getsampwidth(), wav.getframerate(),
                wav.getnframes()) == (1, 2, CFG.sample_rate, 1234)
    back = read_wav(data, "k", CFG.sample_rate)
    assert back.dtype == torch.float32 and back.shape == (1234,)
    assert (back - clip).abs().max() <= 2 / 32768  # written x 32767, read / 32768, rounded
    loud = read_wav(wav_bytes(np.array([2.0, -2.0, 0.5]), CFG.sample_rate), "k", CFG.sample_rate)
    assert loud.tolist() == [32767 / 32768, -32767 / 32768, 16384 / 32768]  # clipped at full scale


def _wav(channels: int = 1, width: int = 2, rate: int = CFG.sample_rate) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as wav:
        wav.setnchannels(channels)
        wav.setsampwidth(width)
        wav.setframerate(rate)
        wav.writeframes(bytes(channels * width * 10))
    return out.getvalue()


@pytest.mark.parametrize("data, what", [
    (b"", "cannot decode its WAV file"),
    (b"RIFF\x00\x00\x00\x00WAVEjunkjunk", "cannot decode its WAV file"),
    (_wav(rate=16000), "sampled at 16000 Hz, the audio encoder reads 8000 Hz (--audio-sample-rate)"),
    (_wav(channels=2), "has 2 channels, the audio encoder reads mono"),
    (_wav(width=1), "holds 8-bit samples, only 16-bit PCM is read"),
    (_wav()[:-7], "is truncated"),
], ids=["empty", "garbage", "16kHz", "stereo", "8-bit", "truncated"])
def test_a_bad_wav_is_one_line_naming_the_sample(data, what):
    with pytest.raises(DataError) as error:
        read_wav(data, "digit0007", CFG.sample_rate)
    message = str(error.value)
    assert message.startswith("sample digit0007: ") and what in message and "\n" not in message


def test_tones_and_features_are_deterministic():
    assert np.array_equal(dtmf(4, 8000, 999, np.random.default_rng(3), 0.05),
                          dtmf(4, 8000, 999, np.random.default_rng(3), 0.05))
    assert not np.array_equal(dtmf(4, 8000, 999, np.random.default_rng(3), 0.05),
                              dtmf(4, 8000, 999, np.random.default_rng(4), 0.05))
    clip = tone(4, 3000)
    assert torch.equal(log_mel(clip, CFG, "k"), log_mel(clip.clone(), CFG, "k"))
    with pytest.raises(DataError, match="cannot carry the 1477 Hz tone"):
        dtmf(9, 2000, 10, np.random.default_rng(0), 0.0)
