"""Every shipped training config: required top-level keys, and the 7B/13B models build (on meta)."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from torchtune import config as tt_config

from povid.checkpoint import llava_hf_config
from povid.config import RECIPES, check_choice, resolve_config
from povid_dpo import SETTING_CHOICES
from povid.model import LLAVA_1_5_13B, LLAVA_1_5_7B

TRAINING_KEYS = {"checkpoint_dir", "data_file", "image_dir", "output_dir", "max_steps", "batch_size", "seed"}
# torchtune's shape: every piece a `_component_` block, the loop under torchtune's key names.
TORCHTUNE_BLOCKS = {"model", "tokenizer", "checkpointer", "dataset", "loss", "optimizer", "lr_scheduler",
                    "metric_logger", "profiler"}  # fmt: skip
TORCHTUNE_LOOP_KEYS = {"epochs", "max_steps_per_epoch", "gradient_accumulation_steps", "log_every_n_steps",
                       "log_peak_memory_stats", "enable_activation_checkpointing", "compile", "shuffle", "seed",
                       "device", "dtype"}  # fmt: skip
BASE_PARAMS = {"7b": 7_063_427_072, "13b": 13_351_494_656}


@pytest.mark.parametrize("name", RECIPES["povid_dpo"])
def test_training_configs_have_override_keys_and_a_valid_objective(name):
    cfg = OmegaConf.load(resolve_config(name))
    assert TRAINING_KEYS <= set(cfg), TRAINING_KEYS - set(cfg)
    loss = tt_config.instantiate(cfg.loss)
    assert loss.objective in ("povid", "povid_released", "dpo")
    assert cfg.noise.source in ("dataset", "online", "none")
    for key, choices in SETTING_CHOICES.items():  # what povid_dpo checks at start
        check_choice(cfg, key, choices)


@pytest.mark.parametrize("name", RECIPES["povid_dpo"] + RECIPES["llava_sft"])
def test_training_configs_have_torchtunes_blocks_and_loop_keys(name):
    cfg = OmegaConf.load(resolve_config(name))
    blocks = TORCHTUNE_BLOCKS - ({"loss", "dataset"} if name.startswith("llava_sft") else set())
    missing = {b for b in blocks if "_component_" not in cfg.get(b, {})}
    assert not missing, f"{name}: no _component_ block {sorted(missing)}"
    assert TORCHTUNE_LOOP_KEYS <= set(cfg), sorted(TORCHTUNE_LOOP_KEYS - set(cfg))
    # Paths are interpolated into the components from the top-level keys, as torchtune does.
    raw = OmegaConf.to_container(cfg, resolve=False)
    assert raw["checkpointer"]["output_dir"] == "${output_dir}"
    assert raw["tokenizer"]["checkpoint_dir"] == raw["checkpointer"]["checkpoint_dir"] == "${checkpoint_dir}"


@pytest.mark.parametrize("name", [n for n in RECIPES["povid_dpo"] if "tiny" not in n])
def test_large_configs_build_on_meta_with_exact_base_size(tmp_path, name):
    size = "13b" if "13b" in name else "7b"
    args = LLAVA_1_5_13B if size == "13b" else LLAVA_1_5_7B
    (tmp_path / "config.json").write_text(json.dumps(llava_hf_config(args, torch.bfloat16)))
    cfg = OmegaConf.load(resolve_config(name))
    cfg.checkpoint_dir = str(tmp_path)
    with torch.device("meta"):
        model = tt_config.instantiate(cfg.model)
    names = dict(model.named_parameters())
    base = sum(p.numel() for n, p in names.items() if "lora_" not in n and "magnitude" not in n)
    assert base == BASE_PARAMS[size]
    adapters = [n for n in names if "lora_" in n]
    if "full" in name:
        assert not adapters
    else:
        # r = 128 on q, k, v, o and the three MLP linears of every layer (POVID's setting)
        assert len(adapters) == 2 * 7 * args.num_layers
        assert names[adapters[0]].shape[0] in (128, args.embed_dim)


@pytest.mark.parametrize("name", RECIPES["povid_eval"])
def test_eval_configs_name_their_protocol_and_a_valid_chair_mode(name):
    from povid.metrics.chair import DEFAULT_CHAIR_MODE, check_chair_mode

    cfg = OmegaConf.load(resolve_config(name))
    assert cfg.benchmark in ("chair", "pope")
    if cfg.benchmark == "chair":
        assert check_chair_mode(cfg.chair.mode) == DEFAULT_CHAIR_MODE == "reference"
        assert cfg.protocol_name and cfg.prompt == "Please describe this image in detail."
        assert cfg.max_new_tokens == 512 and cfg.num_images == 500


def test_opera_preset_is_operas_protocol():
    opera = OmegaConf.load(resolve_config("eval_chair_opera"))
    pinned = OmegaConf.load(resolve_config("eval_chair_coco"))
    assert (opera.protocol_name, pinned.protocol_name) == ("opera-500", "pinned-500")
    assert opera.image_mode == "crop" and pinned.image_mode == "pad"  # OPERA: CLIP's processor
    assert opera.coco_instances_file == "instances_val2014.json"
