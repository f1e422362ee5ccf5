"""The checkpoint records which modules were frozen; optimizer state is refused under another
trainable set (it belongs to the parameters it trained), weights-only loads are not."""

import pytest

from megatron_mimo.checkpoint.contents import check_trainable, frozen_modules
from megatron_mimo.config.presets import tiny_cpu
from megatron_mimo.errors import CheckpointError


def config(**freeze) -> dict:
    data = tiny_cpu().to_dict()
    data["training"].update({f"freeze_{k}": v for k, v in freeze.items()})
    return data


def test_frozen_modules_follow_the_flags_in_a_fixed_order():
    assert frozen_modules(config()) == []
    assert frozen_modules(config(lm=True, vit=True)) == ["vit", "lm"]
    assert frozen_modules(config(projection=True)) == ["projection"]


def test_another_trainable_set_is_refused_with_the_optimizer_only():
    stage1 = {"frozen": ["vit", "lm"]}
    check_trainable(stage1, ["vit", "lm"], loads_optimizer=True)  # the same stage resumes
    check_trainable(stage1, ["vit"], loads_optimizer=False)  # --finetune: weights only
    with pytest.raises(CheckpointError) as error:
        check_trainable(stage1, ["vit"], loads_optimizer=True)
    message = str(error.value)
    assert "\n" not in message
    assert ("trained with frozen vit, lm, this run has frozen vit" in message
            and "resume with --freeze-vit --freeze-lm, or start the new stage with --finetune"
            in message)


def test_a_manifest_older_than_the_record_trained_everything():
    check_trainable({}, [], loads_optimizer=True)
    with pytest.raises(CheckpointError, match="nothing frozen, this run has frozen lm"):
        check_trainable({}, ["lm"], loads_optimizer=True)
