"""README's reproduction table against the release and against the shipped stage configs."""

import re
from pathlib import Path

from omegaconf import OmegaConf

from povid.config import resolve_config

README = Path(__file__).resolve().parents[1] / "README.md"

# Read off YiyangZhou/POVID (scripts/run_dpo.sh, scripts/run_povid.sh, scripts/zero2.json,
# llava/train/train_dpo*.py, tool/dpo_trainer*.py): stage 1, stage 2 (None: not used).
RELEASED = {
    "optimizer.lr": (1e-7, 1e-7),
    "lr_scheduler.warmup_ratio": (0.03, 0.03),
    "optimizer.weight_decay": (0.0, 0.0),
    "epochs": (3, 1),
    "batch_size": (1, 1),
    "gradient_accumulation_steps": (1, 1),
    "model.lora_rank": (128, 128),
    "model.lora_alpha": (256, 256),
    "model.lora_dropout": (0.05, 0.05),
    "disable_dropout": (True, True),  # TRL's DPOTrainer disables every dropout
    "model.lora_attn_modules": (["q_proj", "k_proj", "v_proj", "output_proj"],) * 2,
    "model.apply_lora_to_mlp": (True, True),
    "model.apply_lora_to_output": (False, False),  # find_all_linear_names skips lm_head
    "model.projector_trainable": (False, False),
    "clip_grad_norm": (None, None),  # zero2.json sets no gradient_clipping: DeepSpeed's 0
    "dtype": ("bf16", "bf16"),
    "trainable_dtype": ("fp32", "fp32"),  # DeepSpeed bf16 keeps fp32 master weights
    "loss.objective": ("dpo", "povid_released"),
    "loss.beta": (0.1, 0.1),
    "loss.loss_type": ("sigmoid", "sigmoid"),
    "noise.source": ("none", "online"),
    "noise.step": (None, 500),
    "noise.overflow": (None, "wrap"),  # mul(255).byte()
    "noise.argmax": (None, "separate"),
    "noise.condition": (None, "clean"),
    "max_seq_len": (1048, 1048),  # --model_max_length never reaches the trainer
    "image_mode": ("pad", "pad"),
}


def _cell(text):
    """A cell as the YAML value it spells, read as OmegaConf reads configs (``1e-7`` is a float)."""
    text = text.strip()
    return None if text == "—" else OmegaConf.to_container(OmegaConf.create(f"value: {text}"))["value"]


def _table():
    body = README.read_text().split("<!-- reproduction-table -->")[1].split("<!-- /reproduction-table -->")[0]
    rows = {}
    for line in body.strip().splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        key = re.fullmatch(r"`([^`]+)`", cells[1]).group(1)
        released = [_cell(part) for part in cells[2].split(" / ")]
        rows[key] = (released * 2 if len(released) == 1 else released, _cell(cells[3]), _cell(cells[4]))
    return rows


def test_readme_table_states_the_release():
    table = _table()
    assert set(table) == set(RELEASED)
    for key, (released, _, _) in table.items():
        assert tuple(released) == RELEASED[key], key


def test_stage_configs_reproduce_the_release():
    table = _table()
    for stage, name in enumerate(["povid_7b_lora_stage1", "povid_7b_lora_stage2"]):
        cfg = OmegaConf.load(resolve_config(name))
        for key, (released, *ours) in table.items():
            value = OmegaConf.select(cfg, key)
            assert value == ours[stage], f"{name}: {key} is {value!r}, README says {ours[stage]!r}"
            if RELEASED[key][stage] is not None:
                assert value == RELEASED[key][stage], f"{name}: {key}={value!r}, released {RELEASED[key][stage]!r}"
