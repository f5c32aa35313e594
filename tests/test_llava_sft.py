"""llava_sft end to end on a tiny LLaVA: the loss falls, checkpoints load, resume is exact."""

import json

import pytest
import torch
import llava_sft
from _recipes import crash_at, run_recipe
from _shapes import save_shape_image
from povid.checkpoint import load_llava
from povid.training import answer_cross_entropy, answer_positions



@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    """16 image records (one multi-turn) and one text-only record."""
    directory = tmp_path_factory.mktemp("sft")
    records = []
    for i in range(16):
        colour, shape = save_shape_image(directory / f"{i}.png", i)
        turns = [
            {"from": "human", "value": "<image>\nDescribe this image in detail."},
            {"from": "gpt", "value": f"There is a {colour} {shape} in the middle of the image."},
        ]
        if i == 0:
            turns += [{"from": "human", "value": "Is there a dog in the image?"}, {"from": "gpt", "value": "No, there is not."}]
        records.append({"id": f"s{i}", "image": f"{i}.png", "conversations": turns})
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Is there a cat?"},
                                                    {"from": "gpt", "value": "Yes, there is."}]})  # fmt: skip
    path = directory / "sft.json"
    path.write_text(json.dumps(records))
    return path


def _run(config, ckpt, data, out, *overrides):
    return run_recipe(llava_sft.main, config, ckpt, data, out, "batch_size=4", *overrides)


def test_answer_cross_entropy_shifts_labels():
    logits = torch.full((1, 3, 5), -1e4)
    logits[0, 0, 2] = logits[0, 1, 4] = 0.0  # position t predicts token t + 1
    labels = torch.tensor([[-100, 2, 4]])
    assert answer_cross_entropy(logits, labels) == pytest.approx(0.0, abs=1e-6)
    assert answer_cross_entropy(logits, torch.tensor([[-100, 4, 2]])) > 100


@pytest.mark.parametrize("answer_only", [False, True])
def test_per_answer_cross_entropy_weighs_every_answer_the_same(answer_only):
    torch.manual_seed(0)
    logits = torch.randn(2, 6, 5)
    # Row 0: a two-token answer and a one-token one; row 1: a four-token answer at the row's end.
    labels = torch.tensor([[-100, 1, 2, -100, 3, -100], [-100, -100, 4, 4, 4, 2]])
    one = torch.tensor([[-100, 1, 2, 3, 4, 2], [-100, -100, -100, -100, 3, 2]])

    def loss(labels, per_answer=True):
        # The recipe's answer-only head hands over the logits at answer positions only.
        given = logits[answer_positions(labels)] if answer_only else logits
        return answer_cross_entropy(given, labels, per_answer=per_answer)

    lp = logits.log_softmax(-1)
    answers = [
        -(lp[0, 0, 1] + lp[0, 1, 2]) / 2,
        -lp[0, 3, 3],
        -(lp[1, 1, 4] + lp[1, 2, 4] + lp[1, 3, 4] + lp[1, 4, 2]) / 4,
    ]
    assert loss(labels) == pytest.approx(float(sum(answers) / 3), rel=1e-6)
    # One answer a row: the mean of the rows' token means, not the token mean over the batch.
    rows = [-(lp[0, 0, 1] + lp[0, 1, 2] + lp[0, 2, 3] + lp[0, 3, 4] + lp[0, 4, 2]) / 5, -(lp[1, 3, 3] + lp[1, 4, 2]) / 2]
    assert loss(one) == pytest.approx(float(sum(rows) / 2), rel=1e-6)
    tokens = [-lp[0, t, int(one[0, t + 1])] for t in range(5)] + [-lp[1, 3, 3], -lp[1, 4, 2]]
    assert loss(one, per_answer=False) == pytest.approx(float(sum(tokens) / 7), rel=1e-6)
    assert loss(one) != pytest.approx(float(loss(one, per_answer=False)), rel=1e-3)


def test_full_sft_learns_and_saves_a_loadable_model(tmp_path, tiny_checkpoint, sft_data):
    rows = _run("llava_sft_tiny_full", tiny_checkpoint, sft_data, tmp_path, "epochs=10", "optimizer.lr=3e-3")
    assert len(rows) == 50  # 17 records / 4 = 5 steps per epoch
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.5 * first
    assert {"lr", "grad_norm", "tokens_per_second", "peak_memory_gb"} <= set(rows[-1])
    assert (tmp_path / "final").resolve() == (tmp_path / "step_50").resolve()
    merged = load_llava(tmp_path / "final" / "model")
    base = load_llava(tiny_checkpoint)
    changed = {k.split(".")[0] + "." + k.split(".")[1] for k, v in merged.state_dict().items()
               if not torch.equal(v, base.state_dict()[k])}  # fmt: skip
    # The LLM, the projector and (vision_trainable) the CLIP layers that run all trained.
    assert {"decoder.layers", "encoders.image"} <= changed
    assert any(k.startswith("encoders.image.clip.") and not torch.equal(v, base.state_dict()[k])
               for k, v in merged.state_dict().items())  # fmt: skip
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in merged.state_dict().items() if ".clip_tail." in k)


def test_resume_gives_the_same_losses(tmp_path, tiny_checkpoint, sft_data):
    args = ("epochs=3", "save_every_n_steps=4", "save_merged=false")
    full = _run("llava_sft_tiny_full", tiny_checkpoint, sft_data, tmp_path / "a", *args)
    with pytest.raises(KeyboardInterrupt):
        _run("llava_sft_tiny_full", tiny_checkpoint, sft_data, tmp_path / "b", *args, *crash_at(7))
    resumed = _run("llava_sft_tiny_full", tiny_checkpoint, sft_data, tmp_path / "b", *args, "resume_from_checkpoint=true")
    assert [r["step"] for r in resumed] == list(range(1, 16))
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full], abs=1e-5)


def test_lora_sft_trains_adapters_only(tmp_path, tiny_checkpoint, sft_data):
    rows = _run("llava_sft_tiny_lora", tiny_checkpoint, sft_data, tmp_path, "epochs=4", "save_every_n_steps=10")
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp_path / "step_20" / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "step_10" / "recipe_state.pt").exists()
    merged = load_llava(tmp_path / "final" / "model")
    base = load_llava(tiny_checkpoint)
    changed = [k for k, v in merged.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed and all(k.startswith(("decoder.", "encoders.image.projector")) for k in changed)


def test_torchtune_loop_keys_and_a_swapped_scheduler(tmp_path, tiny_checkpoint, sft_data):
    # torchtune's own scheduler in the lr_scheduler block (absolute warmup steps), two epochs
    # capped at two steps each, the peak-memory metric off.
    rows = _run(
        "llava_sft_tiny_full", tiny_checkpoint, sft_data, tmp_path, "epochs=2", "max_steps_per_epoch=2",
        "optimizer.lr=1e-3", "lr_scheduler._component_=torchtune.training.get_cosine_schedule_with_warmup",
        "~lr_scheduler.warmup_ratio", "lr_scheduler.num_warmup_steps=2", "log_peak_memory_stats=false",
    )  # fmt: skip
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["lr"] == pytest.approx(0.5e-3) and rows[1]["lr"] == pytest.approx(1e-3)
    assert "peak_memory_gb" not in rows[-1]
    # Each capped epoch ends with its checkpoint, as a full one does.
    assert (tmp_path / "step_2").is_dir() and (tmp_path / "step_4").is_dir()


def test_profiler_block_writes_a_trace(tmp_path, tiny_checkpoint, sft_data):
    _run(
        "llava_sft_tiny_full", tiny_checkpoint, sft_data, tmp_path, "max_steps=3", "profiler.enabled=true",
        "profiler.cuda=false", "profiler.wait_steps=0", "profiler.warmup_steps=1", "profiler.active_steps=1",
        "profiler.num_cycles=1",
    )  # fmt: skip
    assert list((tmp_path / "profiling_outputs").rglob("*.json*")), "no trace written"


@pytest.mark.parametrize("per_answer", [False, True])
def test_recipe_loss_on_answer_positions_equals_full_logits(tmp_path, tiny_checkpoint, sft_data, per_answer):
    from _recipes import recipe_after_setup

    recipe = recipe_after_setup(
        llava_sft.LlavaSFTRecipe, "llava_sft_tiny_full", tiny_checkpoint, sft_data, tmp_path,
        "batch_size=4", f"loss_per_answer={per_answer}",
    )  # fmt: skip
    batch = next(iter(recipe.dataloader))
    loss = recipe._loss(batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in recipe.model.named_parameters() if p.grad is not None}
    recipe.model.zero_grad()
    images = {"image": {"images": batch["images"]}} if batch["images"] is not None else None
    full = recipe.model(batch["tokens"], encoder_input=images)
    assert full.dim() == 3  # the answer-only head is scoped to the recipe's own call
    expected = answer_cross_entropy(full, batch["labels"], per_answer=per_answer)
    expected.backward()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert grads and all(torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-7) for n, p in recipe.model.named_parameters() if n in grads)
