"""povid_dpo end to end on a tiny LLaVA: learning, variants, checkpoints, resume, FSDP2."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

import povid_dpo
from _recipes import crash_at, metrics, recipe_after_setup, run_recipe
from povid.checkpoint import load_llava


def _run(config, ckpt, data, out, *overrides):
    return run_recipe(povid_dpo.main, config, ckpt, data, out, *overrides)


def test_lora_learns_over_50_steps(tmp_path, tiny_checkpoint, preference_data):
    rows = _run("povid_tiny_lora", tiny_checkpoint, preference_data, tmp_path, "epochs=13", "save_merged=false")
    assert len(rows) == 52
    first, last = rows[:4], rows[-4:]
    assert first[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    assert sum(r["loss"] for r in last) < sum(r["loss"] for r in first) - 0.2
    assert sum(r["rewards/accuracy"] for r in last) / 4 > sum(r["rewards/accuracy"] for r in first) / 4
    assert all(r["rewards/accuracy"] == 1.0 for r in last)
    assert {"rewards/noise", "loss/noise_term", "lr", "tokens_per_second", "peak_memory_gb"} <= set(rows[-1])
    # the wait for the data loader is part of the step's time, never more
    assert all(0 < r["data_seconds"] < r["step_seconds"] for r in rows)


def test_resume_gives_the_same_losses(tmp_path, tiny_checkpoint, preference_data):
    args = ("epochs=3", "save_every_n_steps=2", "save_merged=false")
    full = _run("povid_tiny_lora", tiny_checkpoint, preference_data, tmp_path / "a", *args)
    with pytest.raises(KeyboardInterrupt):
        _run("povid_tiny_lora", tiny_checkpoint, preference_data, tmp_path / "b", *args, *crash_at(7))
    resumed = _run(
        "povid_tiny_lora", tiny_checkpoint, preference_data, tmp_path / "b", *args,
        "resume_from_checkpoint=true",
    )  # fmt: skip
    assert [r["step"] for r in resumed] == list(range(1, 13))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], abs=1e-6)


def test_precomputed_reference_gives_identical_losses(tmp_path, tiny_checkpoint, preference_data):
    live = _run("povid_tiny_lora", tiny_checkpoint, preference_data, tmp_path / "a", "epochs=2")
    cached = _run(
        "povid_tiny_lora", tiny_checkpoint, preference_data, tmp_path / "b", "epochs=2",
        "reference.precompute=true",
    )  # fmt: skip
    assert list((tmp_path / "b" / "reference_logps").glob("*.pt"))
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in live], abs=1e-6)


def test_full_finetuning_frees_its_reference_copy_once_log_probs_are_cached(tmp_path, tiny_checkpoint, preference_data):
    live = _run("povid_tiny_full", tiny_checkpoint, preference_data, tmp_path / "a", "max_steps=3")
    cached = _run(
        "povid_tiny_full", tiny_checkpoint, preference_data, tmp_path / "b", "max_steps=3",
        "reference.precompute=true",
    )  # fmt: skip
    assert [r["loss"] for r in cached] == pytest.approx([r["loss"] for r in live], abs=1e-6)
    # Set up again: the cache of run b serves every log-prob, so no frozen copy is kept.
    recipe = recipe_after_setup(povid_dpo.POVIDDPORecipe, "povid_tiny_full", tiny_checkpoint, preference_data,
                                tmp_path / "b", "max_steps=3", "reference.precompute=true")  # fmt: skip
    assert recipe.reference.frozen_copy is None and recipe.reference.cache is not None
    recipe.cleanup()
    online = recipe_after_setup(povid_dpo.POVIDDPORecipe, "povid_tiny_full", tiny_checkpoint, preference_data,
                                tmp_path / "c", "max_steps=3", "reference.precompute=true", "noise.source=online")  # fmt: skip
    assert online.reference.frozen_copy is not None  # online noise answers still need a live reference
    online.cleanup()


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("povid_tiny_lora", ["noise.source=online", "loss.objective=povid_released"]),
        ("povid_tiny_lora", ["noise.source=online", "noise.argmax=separate", "noise.condition=noisy"]),
        ("povid_tiny_lora", ["model.use_dora=true", "model.projector_trainable=true"]),
        ("povid_tiny_qlora", []),
        ("povid_tiny_full", ["loss.objective=dpo", "noise.source=none"]),
    ],
)
def test_variants_train_and_save_a_loadable_merged_model(tmp_path, tiny_checkpoint, preference_data, config, overrides):
    rows = _run(config, tiny_checkpoint, preference_data, tmp_path, "epochs=2", *overrides)
    assert len(rows) == 8 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    if "noise.source=online" in overrides:
        assert "rewards/noise" in rows[-1]
    merged = load_llava(tmp_path / "step_8" / "model")
    base = load_llava(tiny_checkpoint)
    changed = [
        k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])
    ]
    assert changed and all(k.startswith(("decoder.", "tok_embeddings", "encoders.image.projector")) for k in changed)


def test_config_blocks_reach_the_run(tmp_path, tiny_checkpoint, preference_data):
    """`loss.beta` is the loss's beta (as logged), and `model.projector_trainable=true`, the
    model block's one switch, trains the projector (a top-level copy used to override it)."""
    _run("povid_tiny_lora", tiny_checkpoint, preference_data, tmp_path, "max_steps=2", "loss.beta=0.2",
         "model.projector_trainable=true", "optimizer.lr=1e-2")  # fmt: skip
    logged = OmegaConf.load(tmp_path / "torchtune_config.yaml")
    assert logged.loss.beta == 0.2 and logged.model.projector_trainable is True
    merged, base = load_llava(tmp_path / "step_2" / "model").state_dict(), load_llava(tiny_checkpoint).state_dict()
    projector = [k for k in base if k.startswith("encoders.image.projector")]
    assert projector and all(not torch.equal(merged[k], base[k]) for k in projector)


def test_a_users_dataset_builder_replaces_ours(tmp_path, tiny_checkpoint, preference_data, monkeypatch):
    """`dataset._component_=` points at any builder; the recipe passes it the transforms and
    noise settings and trains on what it returns."""
    module = tmp_path / "my_data.py"
    module.write_text(
        "from povid_data.preference_dataset import PreferenceDataset\n"
        "CALLS = []\n"
        "def first_four(source, *, keep, **kwargs):\n"
        "    CALLS.append(sorted(kwargs))\n"
        "    dataset = PreferenceDataset(source, **kwargs)\n"
        "    dataset.records = dataset.records[:keep]\n"
        "    return dataset\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = _run("povid_tiny_lora", tiny_checkpoint, preference_data, tmp_path / "out", "batch_size=2",
                "dataset._component_=my_data.first_four", "dataset.keep=4", "save_merged=false")  # fmt: skip
    import my_data

    assert my_data.CALLS == [["image_dir", "image_transform", "message_transform", "noise_fn", "use_noise_answers"]]
    assert len(rows) == 2  # 4 records at batch 2: one epoch is two steps


def test_non_finite_loss_stops_and_names_last_checkpoint(tmp_path, tiny_checkpoint, preference_data):
    with pytest.raises(FloatingPointError, match=r"non-finite loss at step 6 .*step_4"):
        _run("povid_tiny_lora", tiny_checkpoint, preference_data, tmp_path, "epochs=3", "save_every_n_steps=4",
             "loss._component_=_recipes.NaNLoss", "loss.nan_at_call=6")  # fmt: skip
    assert (tmp_path / "step_4" / "recipe_state.pt").exists()
    assert not (tmp_path / "step_6").exists()


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["none", "shared_prompt"])
def test_fsdp2_on_two_processes_matches_one_process(tmp_path, tiny_checkpoint, preference_data, packing):
    # The single process runs row by row; the two processes also with the shared-prompt packing.
    single = _run("povid_tiny_full", tiny_checkpoint, preference_data, tmp_path / "one", "epochs=2", "batch_size=4")
    tune = Path(sys.executable).with_name("tune")
    result = subprocess.run(
        [str(tune), "run", "--nproc_per_node", "2", "povid_dpo", "--config", "povid_tiny_full",
         f"checkpoint_dir={tiny_checkpoint}", f"data_file={preference_data}",
         f"output_dir={tmp_path / 'two'}", "epochs=2", "batch_size=2", f"packing={packing}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = metrics(tmp_path / "two")
    # Same global batch (2 ranks x 2 = 4): the loss curves agree to float32 reduction noise.
    assert [r["loss"] for r in distributed] == pytest.approx([r["loss"] for r in single], abs=1e-5)
    assert (tmp_path / "two" / "step_8" / "model" / "model.safetensors").exists()


def test_noise_condition_noisy_scores_dataset_noise_answers_on_the_distorted_image(
    tmp_path, tiny_checkpoint, preference_data
):
    clean = _run("povid_tiny_lora", tiny_checkpoint, preference_data, tmp_path / "c", "max_steps=1")
    noisy = _run(
        "povid_tiny_lora", tiny_checkpoint, preference_data, tmp_path / "n", "max_steps=1",
        "noise.condition=noisy",
    )  # fmt: skip
    # Same rows, same weights: only the image under the noise rows differs.
    assert noisy[0]["logps/chosen"] == pytest.approx(clean[0]["logps/chosen"], abs=1e-5)
    assert noisy[0]["logps/noise"] != pytest.approx(clean[0]["logps/noise"], abs=1e-4)
