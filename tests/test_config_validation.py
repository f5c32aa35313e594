"""Config keys are checked at parse: a typo or an old name stops the run instead of being ignored,
and what trains comes from the model that was built (issue 13, items 2 and 3)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf
from torchtune import config as tt_config

from povid.config import RENAMED_KEYS, _config_keys, check_override_keys, load_config, resolve_config
from povid.loss import POVIDLoss
from povid.model import llava_1_5, lora_llava_1_5
from _tiny import tiny_llava_args
from povid.training import built_projector_trainable, lora_rank_alpha, set_trainable

REQUIRED = ["checkpoint_dir=ckpt", "data_file=prefs.jsonl"]


def _load(*overrides: str):
    return load_config(["--config", "povid_tiny_lora", *REQUIRED, *overrides])


def _usage_error(capsys, *overrides: str) -> str:
    with pytest.raises(SystemExit) as exc:
        _load(*overrides)
    assert exc.value.code == 2
    return capsys.readouterr().err


def test_loss_block_override_reaches_the_loss():
    cfg = _load("loss.beta=0.2")
    loss = tt_config.instantiate(cfg.loss)
    assert isinstance(loss, POVIDLoss) and loss.beta == 0.2


def test_misspelled_key_names_the_closest_one(capsys):
    err = _usage_error(capsys, "los.beta=0.2")
    assert "unknown key 'los.beta'" in err and "did you mean 'loss.beta'" in err
    err = _usage_error(capsys, "noise.sorce=online")
    assert "did you mean 'noise.source'" in err


def test_unknown_key_without_a_close_match(capsys):
    err = _usage_error(capsys, "completely_unrelated_setting=1")
    assert "unknown key 'completely_unrelated_setting'" in err and "did you mean" not in err


@pytest.mark.parametrize(
    "override, new",
    [("objective.beta=0.2", "loss.beta"), ("objective.objective=dpo", "loss.objective"),
     ("projector_trainable=true", "model.projector_trainable"),
     ("warmup_ratio=0.1", "lr_scheduler.warmup_ratio")],
)  # fmt: skip
def test_old_key_names_give_the_new_one(capsys, override, new):
    err = _usage_error(capsys, override)
    assert f"use {new!r}" in err


def test_component_blocks_take_new_keyword_arguments():
    # AdamW's own argument, not in the YAML: goes to the component, which checks it.
    cfg = _load("optimizer.betas=[0.9,0.95]")
    assert list(cfg.optimizer.betas) == [0.9, 0.95]
    # A user's own builder swapped in on the command line, with an argument of its own.
    cfg = _load("model._component_=my_pkg.my_builder", "model.my_knob=3")
    assert cfg.model._component_ == "my_pkg.my_builder" and cfg.model.my_knob == 3


def test_existing_keys_and_removals_pass():
    cfg = _load("noise.source=online", "model.lora_rank=4", "~clip_dir")
    assert cfg.noise.source == "online" and cfg.model.lora_rank == 4 and "clip_dir" not in cfg


def test_check_override_keys_direct():
    yaml_cfg = OmegaConf.create({"a": 1, "block": {"b": 2}, "comp": {"_component_": "x.y", "c": 3}})
    check_override_keys(yaml_cfg, ["a=2", "block.b=3", "comp.new=1"])
    with pytest.raises(ValueError, match="did you mean 'block.b'"):
        check_override_keys(yaml_cfg, ["block.bb=3"])
    with pytest.raises(ValueError, match="unknown key 'block.new'"):
        check_override_keys(yaml_cfg, ["block.new=1"])  # not a component: no new keys


def test_no_packaged_config_still_uses_a_renamed_key():
    from povid.config import packaged_configs

    for name in packaged_configs():
        keys = _config_keys(OmegaConf.load(resolve_config(name)))
        top = {k.split(".")[0] for k in keys}
        assert not top & set(RENAMED_KEYS), f"{name} still has {sorted(top & set(RENAMED_KEYS))}"


def test_povid_reference_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="povid_released"):
        loss = POVIDLoss(objective="povid_reference")
    assert loss.objective == "povid_released"


@pytest.mark.parametrize("projector", [True, False])
def test_trainable_set_follows_the_built_model(projector):
    args = tiny_llava_args(vocab_size=100)
    for model in (llava_1_5(args, projector_trainable=projector),
                  lora_llava_1_5(args, lora_rank=4, lora_alpha=12, projector_trainable=projector)):  # fmt: skip
        assert built_projector_trainable(model) is projector
        trainable = set_trainable(model, projector_trainable=built_projector_trainable(model))
        assert any("projector" in n for n in trainable) is projector


def test_lora_rank_alpha_read_from_the_adapters():
    args = tiny_llava_args(vocab_size=100)
    assert lora_rank_alpha(lora_llava_1_5(args, lora_rank=4, lora_alpha=12)) == (4, 12.0)
    assert lora_rank_alpha(lora_llava_1_5(args, lora_rank=2, lora_alpha=3, use_dora=True)) == (2, 3.0)
    with pytest.raises(ValueError, match="none"):
        lora_rank_alpha(llava_1_5(args))
