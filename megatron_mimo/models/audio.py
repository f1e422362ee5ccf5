"""Audio branch: a Whisper-style encoder (two 1-D convolutions over log-mel frames, the second
with stride 2, learned position embeddings, a megatron-core ``TransformerBlock`` with a final
LayerNorm), consecutive outputs stacked ``frame_stack`` at a time, then the same 2-layer GELU MLP
projector as the images branch into the language hidden size. One clip, padded to
``max_frames``, fills exactly ``num_audio_tokens`` audio-token slots of its sample.

Tensor parallelism: only the transformer layers and the projector are split, over the branch's
own TP group (from its ``ProcessGroupCollection``, never the global ``parallel_state``). The
convolutions, position embeddings and final norm are replicated: every TP rank builds them
first, from the same seeded default generator, and feeds them the same features, so they hold
the same values and receive the same gradients (the TP layers all-reduce their input grads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from megatron.core.models.mimo.submodules.audio import AudioModalitySubmodules
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
)
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mimo.config import AudioModelConfig
from megatron_mimo.models.common import build_transformer_config
from megatron_mimo.models.vision import layer_spec_and_norm, projector_spec

ENCODER_NAME = "whisper"
"""Key of the encoder inside the audio submodule (``modality_inputs['audio']['whisper']``)."""


class WhisperEncoder(MegatronModule):
    """Log-mel features ``[b, mel, max_frames]`` -> audio tokens
    ``[b, num_audio_tokens, frame_stack * hidden]``, in sample order (``MimoModel`` fills the
    audio slots of sample i with rows ``i * num_audio_tokens`` onwards of the flattened output).

    The stride-2 convolution halves the frames the transformer attends over (Whisper's
    choice); stacking then shortens the sequence the language model sees without dropping
    anything (each token carries ``frame_stack`` consecutive encoder outputs).
    """

    def __init__(self, config: TransformerConfig, transformer_layer_spec: ModuleSpec,
                 norm: type, num_mel_bins: int, max_frames: int, frame_stack: int,
                 pg_collection: ProcessGroupCollection | None) -> None:
        super().__init__(config=config)
        if pg_collection is None:
            # TransformerBlock would fall back to the global parallel_state groups
            raise ValueError("the audio encoder is built only on the audio branch's ranks, "
                             "with that branch's process groups (got pg_collection=None)")
        hidden = config.hidden_size
        self.encoder_frames, self.frame_stack = max_frames // 2, frame_stack
        self.pg_collection = pg_collection
        self.tp_group = pg_collection.tp  # sharded_state_dict: else parallel_state's TP group
        # replicated stem, built before the TP layers (identical draws on every TP rank)
        self.conv1 = torch.nn.Conv1d(num_mel_bins, hidden, kernel_size=3, padding=1)
        self.conv2 = torch.nn.Conv1d(hidden, hidden, kernel_size=3, stride=2, padding=1)
        self.position_embeddings = torch.nn.Parameter(
            torch.zeros(self.encoder_frames, hidden, dtype=config.params_dtype))
        if config.perform_initialization:
            config.init_method(self.position_embeddings)
        layers = TransformerBlockSubmodules(
            layer_specs=[transformer_layer_spec] * config.num_layers, layer_norm=norm)
        self.transformer = TransformerBlock(config=config, spec=layers, pre_process=True,
                                            post_process=True, pg_collection=pg_collection)

    def set_input_tensor(self, input_tensor: torch.Tensor) -> None:
        """Pipeline hook (the audio branch has one stage; kept for the schedule's interface)."""
        self.transformer.set_input_tensor(input_tensor)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """``[b, mel, max_frames]`` -> ``[b, num_audio_tokens, frame_stack * hidden]``."""
        # the features arrive as a keyword argument, which Float16Module does not cast
        x = features.to(self.conv1.weight.dtype)
        x = F.gelu(self.conv1(x))
        x = F.gelu(self.conv2(x))  # [b, h, encoder_frames]
        if x.shape[-1] != self.encoder_frames:
            raise ValueError(f"audio features give {x.shape[-1]} encoder frames, expected "
                             f"{self.encoder_frames} (pad every clip to max_frames "
                             f"{2 * self.encoder_frames})")
        x = x.permute(2, 0, 1) + self.position_embeddings.unsqueeze(1)  # [s, b, h]
        x = self.transformer(x.contiguous(), attention_mask=None)  # bidirectional: no mask
        return rearrange(x, "(n k) b h -> b n (k h)", k=self.frame_stack)


def encoder_spec(cfg: AudioModelConfig, tp: int, pgs: ProcessGroupCollection | None,
                 device: torch.device, precision: str = "fp32") -> ModuleSpec:
    """The Whisper-style encoder, with megatron-core's ViT layer spec (bidirectional, pre-norm):
    Transformer Engine's on a GPU with TE, else the local one whose norms checkpoint under TE's
    names, so a branch saved on a CPU loads on a GPU (and the final norm's keys match too)."""
    config = build_transformer_config(cfg, tp, device, precision)
    layer_spec, norm = layer_spec_and_norm(device)
    return ModuleSpec(module=WhisperEncoder, params={
        "config": config, "transformer_layer_spec": layer_spec, "norm": norm,
        "num_mel_bins": cfg.num_mel_bins, "max_frames": cfg.max_frames,
        "frame_stack": cfg.frame_stack, "pg_collection": pgs})


def audio_submodule_spec(cfg: AudioModelConfig, language_hidden_size: int, tp: int,
                         pgs: ProcessGroupCollection | None, device: torch.device,
                         precision: str = "fp32") -> ModuleSpec:
    """ModuleSpec of the audio branch for ``MimoModel`` (encoder + 2-layer MLP projector); its
    forward gives ``[b * num_audio_tokens, language_hidden_size]``. ``pgs`` is None on ranks
    outside the branch, which never build it."""
    return ModuleSpec(
        module=AudioModalitySubmodules,
        submodules={"encoders": {ENCODER_NAME: encoder_spec(cfg, tp, pgs, device, precision)},
                    "input_projections": [projector_spec(cfg, cfg.projector_input_size,
                                                         language_hidden_size, tp, pgs, device,
                                                         precision)]},
        params={"pg_collection": pgs})


def audio_inputs(features: torch.Tensor) -> dict:
    """``modality_inputs`` entry for a batch of log-mel features ``[b, num_mel_bins,
    max_frames]``."""
    return {ENCODER_NAME: {"features": features}}
