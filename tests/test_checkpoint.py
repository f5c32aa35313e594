"""Checkpoint I/O: logit parity with transformers for layouts A-D, round trips, clear errors."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlavaForConditionalGeneration

from hf_llava import (
    IMAGE_TOKEN_INDEX,
    TEXT_VOCAB,
    hf_logits,
    make_inputs,
    make_tiny_hf_llava,
    save_llava_layout,
)
from povid.checkpoint import LlavaCheckpointer, load_llava, load_model_state
from povid.model import llava_1_5, lora_llava_1_5


@pytest.fixture(scope="module")
def hf_model():
    return make_tiny_hf_llava(seed=1)


@pytest.fixture(scope="module")
def hf_inputs(hf_model):
    return make_inputs(hf_model.config, batch_size=2, seed=3)


def _load_ours(checkpoint_dir, clip_dir=None):
    checkpointer = LlavaCheckpointer(checkpoint_dir, clip_dir=clip_dir)
    model = llava_1_5(checkpointer.args).eval()
    load_model_state(model, checkpointer.load_checkpoint()["model"], checkpoint_dir)
    return model


CASES = [
    dict(layout="A"),
    dict(layout="A'", fmt="bin", shards=2),
    dict(layout="B", shards=3),
    dict(layout="B", fmt="bin", position_ids=True),
    dict(layout="C"),
    dict(layout="D"),
    dict(layout="D", fmt="bin", shards=2, clip_style="clip_model", d_config_style="v1.5"),
    dict(layout="D", clip_style="transformers5", include_frozen_tower=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_logits_match_transformers(tmp_path, hf_model, hf_inputs, case):
    info = save_llava_layout(hf_model, tmp_path / "ckpt", **case)
    ids, pixels = hf_inputs
    with torch.no_grad():
        ours = _load_ours(tmp_path / "ckpt")(ids, encoder_input={"image": {"images": pixels}})
    reference = hf_logits(hf_model, ids, pixels)
    if case["layout"] == "D":
        # The original vocabulary has no rows for <image>/<pad>; the text logits must agree.
        assert ours.shape[-1] == info["text_vocab_size"] == TEXT_VOCAB
        reference = reference[..., :TEXT_VOCAB]
    assert ours.shape == reference.shape
    assert (ours - reference).abs().max().item() < 1e-5


@pytest.mark.parametrize("layout", ["B", "D"])
def test_saved_checkpoint_loads_in_transformers_with_every_tensor(tmp_path, hf_model, hf_inputs, layout):
    save_llava_layout(hf_model, tmp_path / "ckpt", layout)
    checkpointer = LlavaCheckpointer(tmp_path / "ckpt", output_dir=tmp_path / "out")
    model = _load_ours(tmp_path / "ckpt")
    out = checkpointer.save_checkpoint(model.state_dict())
    reloaded = LlavaForConditionalGeneration.from_pretrained(out).eval()
    # Tensors that never change the logits (the CLIP layer after the feature layer,
    # post_layernorm, attention k biases) are compared one by one.
    original, saved = hf_model.state_dict(), reloaded.state_dict()
    assert original.keys() == saved.keys()
    for key, tensor in original.items():
        got = saved[key]
        if layout == "D" and key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            assert got.shape[0] % 64 == 0 and got.shape[0] >= TEXT_VOCAB + 2
            assert torch.equal(got[:TEXT_VOCAB], tensor[:TEXT_VOCAB])
            assert torch.allclose(got[TEXT_VOCAB], tensor[:TEXT_VOCAB].mean(0), atol=1e-6)
            continue
        assert torch.equal(got, tensor), key
    ids, pixels = hf_inputs
    with torch.no_grad():
        ours = model(ids, encoder_input={"image": {"images": pixels}})
        theirs = reloaded(input_ids=ids, pixel_values=pixels).logits[..., : ours.shape[-1]]
    assert (ours - theirs).abs().max().item() < 1e-5
    if layout == "D":
        assert json.loads((out / "config.json").read_text())["image_token_index"] == TEXT_VOCAB


def test_load_save_load_round_trips_bit_exactly(tmp_path, hf_model):
    save_llava_layout(hf_model, tmp_path / "ckpt", "B", dtype=torch.bfloat16)
    first = LlavaCheckpointer(tmp_path / "ckpt", output_dir=tmp_path / "out")
    state = first.load_checkpoint()["model"]
    out = first.save_checkpoint(state)
    again = LlavaCheckpointer(out).load_checkpoint()["model"]
    assert state.keys() == again.keys()
    for key in state:
        assert state[key].dtype == again[key].dtype == torch.bfloat16
        assert torch.equal(state[key], again[key]), key


def test_load_llava_for_inference_builds_on_meta_and_matches(tmp_path, hf_model, hf_inputs):
    save_llava_layout(hf_model, tmp_path / "ckpt", "C")
    model = load_llava(tmp_path / "ckpt")
    assert not any(t.is_meta for t in list(model.parameters()) + list(model.buffers()))
    ids, pixels = hf_inputs
    with torch.no_grad():
        ours = model(ids, encoder_input={"image": {"images": pixels}})
    assert (ours - hf_logits(hf_model, ids, pixels)).abs().max().item() < 1e-5


def test_lora_adapters_saved_on_their_own(tmp_path, hf_model):
    save_llava_layout(hf_model, tmp_path / "ckpt", "B")
    checkpointer = LlavaCheckpointer(tmp_path / "ckpt", output_dir=tmp_path / "out")
    model = lora_llava_1_5(checkpointer.args, lora_rank=4, lora_alpha=8)
    load_model_state(model, checkpointer.load_checkpoint()["model"], tmp_path / "ckpt")
    adapters = {k: v for k, v in model.state_dict().items() if "lora_" in k}
    assert adapters
    checkpointer.save_adapter(
        adapters, tmp_path / "out" / "adapter",
        {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "output_proj", "w1", "w2", "w3"]},
    )  # fmt: skip
    ours = torch.load(tmp_path / "out" / "adapter" / "adapter_model.pt")
    assert ours.keys() == adapters.keys()
    peft = load_file(tmp_path / "out" / "adapter" / "adapter_model.safetensors")
    assert len(peft) == len(adapters)
    assert all(k.startswith("base_model.model.language_model.model.layers.") for k in peft)
    config = json.loads((tmp_path / "out" / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and "o_proj" in config["target_modules"]


# ------------------------------------------------------------------------------- bad input


def test_missing_directory_config_and_weights_are_named(tmp_path, hf_model):
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlavaCheckpointer(tmp_path / "nothing")
    save_llava_layout(hf_model, tmp_path / "ckpt", "B")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"ckpt: no model weights found"):
        LlavaCheckpointer(tmp_path / "ckpt").load_checkpoint()


def test_missing_shard_is_named(tmp_path, hf_model):
    info = save_llava_layout(hf_model, tmp_path / "ckpt", "B", shards=2)
    info["files"][1].unlink()
    with pytest.raises(FileNotFoundError, match=info["files"][1].name):
        LlavaCheckpointer(tmp_path / "ckpt").load_checkpoint()


def test_missing_and_unexpected_keys_are_listed(tmp_path, hf_model):
    save_llava_layout(hf_model, tmp_path / "ckpt", "B")
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(path)
    del tensors["language_model.model.layers.1.mlp.down_proj.weight"]
    tensors["language_model.model.layers.1.mlp.extra_proj.weight"] = torch.zeros(2)
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"keys of no known LLaVA layout: lm\.model\.layers\.1\.mlp\.extra_proj"):
        LlavaCheckpointer(tmp_path / "ckpt").load_checkpoint()
    del tensors["language_model.model.layers.1.mlp.extra_proj.weight"]
    save_file(tensors, path)
    checkpointer = LlavaCheckpointer(tmp_path / "ckpt")
    model = llava_1_5(checkpointer.args)
    with pytest.raises(ValueError, match=r"missing 1 keys: decoder\.layers\.1\.mlp\.w2\.weight"):
        load_model_state(model, checkpointer.load_checkpoint()["model"], tmp_path / "ckpt")


def test_shape_mismatch_is_named(tmp_path, hf_model):
    save_llava_layout(hf_model, tmp_path / "ckpt", "B")
    config_path = tmp_path / "ckpt" / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"]["intermediate_size"] = 96
    config_path.write_text(json.dumps(config))
    checkpointer = LlavaCheckpointer(tmp_path / "ckpt")
    model = llava_1_5(checkpointer.args)
    with pytest.raises(ValueError, match=r"shape mismatch .*mlp\.w1\.weight \(128, 64\) vs model \(96, 64\)"):
        load_model_state(model, checkpointer.load_checkpoint()["model"], tmp_path / "ckpt")


def test_corrupt_weights_file_is_named(tmp_path, hf_model):
    save_llava_layout(hf_model, tmp_path / "ckpt", "B")
    (tmp_path / "ckpt" / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match=r"model\.safetensors: cannot read weights"):
        LlavaCheckpointer(tmp_path / "ckpt").load_checkpoint()


def test_original_layout_without_clip_tower_says_what_to_pass(tmp_path, hf_model):
    save_llava_layout(hf_model, tmp_path / "ckpt", "D", mm_vision_tower="openai/clip-vit-large-patch14-336")
    with pytest.raises(FileNotFoundError, match="clip_dir="):
        LlavaCheckpointer(tmp_path / "ckpt")
    # Given explicitly, the CLIP directory is found.
    model = _load_ours(tmp_path / "ckpt", clip_dir=tmp_path / "ckpt-clip")
    assert model.llava_args.image_token_id == IMAGE_TOKEN_INDEX
