"""The audio branch (megatron_mimo/models/audio.py) in a gloo world of one process: shapes, the
order of the tokens, gradients, initialisation, 16-bit wrapping and checkpoint keys."""

from __future__ import annotations

import pytest
import torch
from megatron.core.models.mimo.submodules.audio import AudioModalitySubmodules
from megatron.core.transformer.module import Float16Module

from megatron_mimo.config import AUDIO, AudioModelConfig
from megatron_mimo.config.memory import audio_parameters
from megatron_mimo.convert.single import one_process_world
from megatron_mimo.models.audio import (
    ENCODER_NAME,
    WhisperEncoder,
    audio_inputs,
    audio_submodule_spec,
)
from megatron_mimo.training.seeding import seed_rank

CPU = torch.device("cpu")
LANGUAGE_HIDDEN = 48
CONFIGS = {
    "default": AudioModelConfig(),
    "stack4": AudioModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2,
                               ffn_hidden_size=64, num_mel_bins=8, max_frames=24, frame_stack=4,
                               projector_ffn_hidden_size=40),
}


@pytest.fixture(scope="module")
def pgs():
    """Process groups of a one-rank world, with megatron's RNG tracker seeded (attention forks
    its stream even without dropout)."""
    with one_process_world() as groups:
        seed_rank(0, AUDIO, tp_rank=0)
        yield groups


def build(pgs, cfg: AudioModelConfig = CONFIGS["default"], seed: int = 0,
          precision: str = "fp32") -> AudioModalitySubmodules:
    torch.manual_seed(seed)
    return AudioModalitySubmodules.from_spec(
        audio_submodule_spec(cfg, LANGUAGE_HIDDEN, 1, pgs, CPU, precision))


def features(cfg: AudioModelConfig, batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, cfg.num_mel_bins, cfg.max_frames, generator=generator)


def run(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    return module(encoder_inputs=audio_inputs(x))


def encoder_of(module: AudioModalitySubmodules) -> WhisperEncoder:
    return module.encoders[ENCODER_NAME]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_output_is_one_row_per_audio_token(pgs, name):
    cfg = CONFIGS[name]
    out = run(build(pgs, cfg), features(cfg, 3))
    assert out.shape == (3 * cfg.num_audio_tokens, LANGUAGE_HIDDEN)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_parameter_count_matches_the_memory_estimate(pgs, name):
    cfg = CONFIGS[name]
    module = build(pgs, cfg)
    assert sum(p.numel() for p in module.parameters()) == audio_parameters(cfg, LANGUAGE_HIDDEN, 1)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_clip_fills_its_own_rows_in_sample_order(pgs, name):
    """Two clips batched give the rows of each alone, first clip first: MimoModel puts rows
    ``i * num_audio_tokens`` onwards into the audio slots of sample i."""
    cfg = CONFIGS[name]
    module, x = build(pgs, cfg), features(cfg, 2)
    both = run(module, x)
    n = cfg.num_audio_tokens
    torch.testing.assert_close(both[:n], run(module, x[:1]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(both[n:], run(module, x[1:]), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(both[:n], both[n:])


def test_a_token_concatenates_consecutive_encoder_frames(pgs):
    """Token t of a clip is transformer outputs k t .. k t + k - 1 side by side (k =
    frame_stack), read from the sequence-first ``[s, b, h]`` the TransformerBlock returns."""
    cfg = CONFIGS["stack4"]
    encoder = encoder_of(build(pgs, cfg))
    seen = {}
    encoder.transformer.register_forward_hook(lambda _m, _i, out: seen.update(out=out))
    tokens = encoder(features(cfg, 2))
    frames = seen["out"]  # [encoder_frames, b, h]
    k, h = cfg.frame_stack, cfg.hidden_size
    assert frames.shape == (cfg.encoder_frames, 2, h)
    assert tokens.shape == (2, cfg.num_audio_tokens, k * h)
    for b in range(2):
        for t in range(cfg.num_audio_tokens):
            for j in range(k):
                assert torch.equal(tokens[b, t, j * h:(j + 1) * h], frames[k * t + j, b])


def test_the_stem_convolves_along_time(pgs):
    """Changing log-mel frame f of one clip changes only the transformer inputs of that clip at
    the positions p the two convolutions see it from (|2p - f| <= 2): time is the convolved and
    the sequence axis, the batch axis is not mixed in."""
    cfg = CONFIGS["default"]
    encoder = encoder_of(build(pgs, cfg))
    seen = []
    encoder.transformer.register_forward_pre_hook(lambda _m, args, _kw: seen.append(args[0]),
                                                  with_kwargs=True)
    x = features(cfg, 2)
    frame = 11
    changed = x.clone()
    changed[1, :, frame] += 1.0
    encoder(x)
    encoder(changed)
    before, after = seen  # [s, b, h]
    torch.testing.assert_close(before[:, 0], after[:, 0], rtol=0, atol=0)
    moved = {p for p in range(cfg.encoder_frames) if not torch.equal(before[p, 1], after[p, 1])}
    assert moved == {p for p in range(cfg.encoder_frames) if abs(2 * p - frame) <= 2}


def test_gradients_reach_every_parameter(pgs):
    cfg = CONFIGS["default"]
    module = build(pgs, cfg)
    out = run(module, features(cfg, 2))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3))
    (out * weights).sum().backward()
    names = [name for name, _ in module.named_parameters()]
    for part in ("conv1.weight", "conv2.bias", "position_embeddings", "transformer.layers.0.",
                 "transformer.layers.1.", "final_layernorm", "input_projections.0."):
        assert any(part in name for name in names), part
    missing = [name for name, p in module.named_parameters()
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_different_inputs_give_different_outputs(pgs):
    cfg = CONFIGS["default"]
    module = build(pgs, cfg)
    a, b = run(module, features(cfg, 1, seed=1)), run(module, features(cfg, 1, seed=2))
    assert (a - b).abs().max() > 1e-3


def test_initialisation_is_deterministic_under_a_seed(pgs):
    first, again, other = build(pgs, seed=7), build(pgs, seed=7), build(pgs, seed=8)
    pairs = list(zip(first.state_dict().items(), again.state_dict().items(), strict=True))
    assert all(n1 == n2 and torch.equal(v1, v2) for (n1, v1), (n2, v2) in pairs
               if isinstance(v1, torch.Tensor))
    differ = {name for (name, v1), (_, v2) in zip(first.state_dict().items(),
                                                  other.state_dict().items(), strict=True)
              if isinstance(v1, torch.Tensor) and not torch.equal(v1, v2)}
    for part in ("conv1.weight", "position_embeddings", "linear_qkv.weight", "linear_fc1.weight"):
        assert any(part in name for name in differ), part
    # the default generator advanced by the build, and identically: the next draw agrees
    build(pgs, seed=7)
    draw = torch.rand(1)
    build(pgs, seed=7)
    assert torch.equal(draw, torch.rand(1))


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
@pytest.mark.parametrize("input_dtype", ["fp32", "16-bit"])
def test_16_bit_through_float16module(pgs, precision, dtype, input_dtype):
    """Float16Module casts the weights (and positional inputs only: the features come as a
    keyword); the encoder casts them itself, whatever dtype the caller passes."""
    cfg = CONFIGS["default"]
    x = features(cfg, 2)
    reference = run(build(pgs, cfg), x)
    module = build(pgs, cfg, precision=precision)
    wrapped = Float16Module(encoder_of(module).config, module)
    wrapped.pg_collection = pgs
    assert all(p.dtype == dtype for p in module.parameters())
    out = run(wrapped, x if input_dtype == "fp32" else x.to(dtype))
    assert out.dtype == torch.float32  # upcast on the (only) last stage
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()
    out.sum().backward()
    assert all(p.grad is not None for p in module.parameters())


def test_norms_checkpoint_under_transformer_engine_names(pgs):
    """A CPU-built branch saves its layer norms as TE's fused layers name them (so it loads on
    a GPU); the final norm has the same name in both builds."""
    keys = {value.key for value in build(pgs).sharded_state_dict().values()}
    prefix = f"encoders.{ENCODER_NAME}.transformer."
    assert f"{prefix}layers.self_attention.linear_qkv.layer_norm_weight" in keys
    assert f"{prefix}layers.mlp.linear_fc1.layer_norm_bias" in keys
    assert f"{prefix}final_layernorm.weight" in keys
    assert not any("input_layernorm" in key or "pre_mlp_layernorm" in key for key in keys)


def test_ranks_outside_the_branch_get_a_spec_but_cannot_build_it():
    spec = audio_submodule_spec(CONFIGS["default"], LANGUAGE_HIDDEN, 1, None, CPU)
    with pytest.raises(ValueError, match="pg_collection=None"):
        AudioModalitySubmodules.from_spec(spec)


def test_unpadded_clips_are_an_error(pgs):
    cfg = CONFIGS["default"]
    with pytest.raises(ValueError, match="pad every clip to max_frames"):
        run(build(pgs, cfg), torch.randn(1, cfg.num_mel_bins, cfg.max_frames - 4))
