"""The tiny transformers LLaVA fixtures (tests/hf_llava.py) write what they claim to write.

For every checkpoint layout: the exact key set (documented prefixes only), tensors identical to
the model's, sharded == single-file, A-C reload in transformers to bitwise-identical logits, and
layout D (original LLaVA) is text-vocab only, vision-free, with its CLIP tower in its own
directory, and still describes the same model.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import hf_llava as H  # noqa: E402
from transformers import (  # noqa: E402
    CLIPModel,
    CLIPVisionModel,
    LlavaForConditionalGeneration,
)

# Key patterns per layout, written out independently of hf_llava's renaming code.
_LM = (
    r"(embed_tokens\.weight|norm\.weight|layers\.\d+\.(self_attn\.[qkvo]_proj\.weight"
    r"|mlp\.(gate|up|down)_proj\.weight|(input|post_attention)_layernorm\.weight))"
)
_CLIP = (
    r"(embeddings\.(class_embedding|patch_embedding\.weight|position_embedding\.weight)"
    r"|(pre_layrnorm|post_layernorm)\.(weight|bias)"
    r"|encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|layer_norm[12]|mlp\.fc[12])"
    r"\.(weight|bias))"
)
_PROJ = r"linear_[12]\.(weight|bias)"
PATTERNS = {
    "A": [rf"model\.vision_tower\.vision_model\.{_CLIP}", rf"model\.multi_modal_projector\.{_PROJ}",
          rf"model\.language_model\.{_LM}", r"lm_head\.weight"],
    "A'": [rf"model\.vision_tower\.{_CLIP}", rf"model\.multi_modal_projector\.{_PROJ}",
           rf"model\.language_model\.{_LM}", r"lm_head\.weight"],
    "B": [rf"vision_tower\.vision_model\.{_CLIP}", rf"multi_modal_projector\.{_PROJ}",
          rf"language_model\.model\.{_LM}", r"language_model\.lm_head\.weight"],
    "C": [rf"vision_tower\.{_CLIP}", rf"multi_modal_projector\.{_PROJ}",
          rf"language_model\.model\.{_LM}", r"language_model\.lm_head\.weight"],
    "D": [rf"model\.{_LM}", r"model\.mm_projector\.[02]\.(weight|bias)", r"lm_head\.weight"],
}
# 4 groups (3 for D) x tiny model: vision 3 + 2 + 16 * 3 + 2, projector 4, LM 1 + 9 * 2 + 1, head 1.
N_VISION, N_PROJ, N_LM = 55, 4, 20


def _to_memory_name(key: str, layout: str) -> str:
    """Inverse renaming, test-side: layout key -> transformers 5.23 in-memory key."""
    if layout in ("A", "A'"):
        return key.replace("model.vision_tower.vision_model.", "model.vision_tower.")
    if layout in ("B", "C"):
        key = key.replace("vision_tower.vision_model.", "vision_tower.")
        if key == "language_model.lm_head.weight":
            return "lm_head.weight"
        for old, new in (("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector."),
                         ("language_model.model.", "model.language_model.")):
            if key.startswith(old):
                return new + key[len(old):]
    if layout == "D":
        if key == "lm_head.weight":
            return key
        key = key.replace("model.mm_projector.0.", "model.multi_modal_projector.linear_1.")
        key = key.replace("model.mm_projector.2.", "model.multi_modal_projector.linear_2.")
        if key.startswith("model.multi_modal_projector."):
            return key
        return "model.language_model." + key[len("model."):]
    raise AssertionError(f"cannot invert {key!r} for layout {layout}")


@pytest.fixture(scope="module")
def model():
    return H.make_tiny_hf_llava(seed=0)


@pytest.fixture(scope="module")
def inputs(model):
    return H.make_inputs(model.config, batch_size=2, seq_len=24, images_per_row=1, seed=1)


@pytest.fixture(scope="module")
def ref_logits(model, inputs):
    return H.hf_logits(model, *inputs)


@pytest.fixture(scope="module")
def out_root(tmp_path_factory):
    return tmp_path_factory.mktemp("hf_layouts")


def _reload_and_compare(path, inputs, ref_logits):
    loaded, info = LlavaForConditionalGeneration.from_pretrained(path, output_loading_info=True)
    problems = {k: v for k, v in info.items() if v}
    assert not problems, problems
    assert torch.equal(H.hf_logits(loaded, *inputs), ref_logits)


# ---------------------------------------------------------------------------------------------


def test_tiny_config_is_llava_15_shaped(model):
    cfg = model.config
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert cfg.vision_config.hidden_act == "quick_gelu"
    assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy) == (-2, "default")
    assert cfg.projector_hidden_act == "gelu" and cfg.multimodal_projector_bias
    assert not cfg.tie_word_embeddings and not cfg.text_config.tie_word_embeddings
    assert cfg.image_token_index == H.IMAGE_TOKEN_INDEX
    assert cfg.text_config.vocab_size == H.PADDED_VOCAB
    assert H.num_image_tokens(cfg) == cfg.image_seq_length == 9
    assert next(model.parameters()).dtype == torch.float32 and not model.training


def test_weights_are_seeded_and_non_trivial(model):
    again = H.make_tiny_hf_llava(seed=0)
    other = H.make_tiny_hf_llava(seed=1)
    sd, sd_again, sd_other = model.state_dict(), again.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_again[k]) for k in sd)
    assert all(not torch.equal(sd[k], sd_other[k]) for k in sd)
    for key, t in sd.items():
        assert t.std() > 0.01, key  # nothing left constant (norm gains, biases included)
        if key.endswith(("norm.weight", "layrnorm.weight", "norm1.weight", "norm2.weight")):
            assert (t - 1).abs().max() > 0.1, key
    emb = sd["model.language_model.embed_tokens.weight"]
    assert not torch.allclose(emb, sd["lm_head.weight"])
    # Distinct tensors of equal shape differ, so a swapped mapping changes the output.
    assert not torch.equal(sd["model.language_model.layers.0.self_attn.q_proj.weight"],
                           sd["model.language_model.layers.0.self_attn.k_proj.weight"])


def test_every_tensor_moves_the_logits_except_the_invisible_ones():
    """Any tensor mapped wrongly shows in the logits, except those that cannot: the last CLIP
    layer and post_layernorm (vision_feature_layer=-2 skips them, as in LLaVA-1.5) and the
    key biases of attention (softmax is invariant to a per-query constant). Loaders must be
    checked key by key for those."""
    probe = H.make_tiny_hf_llava(seed=0)
    ids, pixels = H.make_inputs(probe.config, batch_size=1, seq_len=12, seed=5)
    ref = H.hf_logits(probe, ids, pixels)
    last = probe.config.vision_config.num_hidden_layers - 1
    unused = (f"model.vision_tower.encoder.layers.{last}.", "model.vision_tower.post_layernorm.")
    still = []
    with torch.no_grad():
        for name, param in probe.named_parameters():
            if name.startswith(unused):
                continue
            saved = param.detach().clone()
            param.mul_(1.1).add_(0.01)
            if torch.allclose(H.hf_logits(probe, ids, pixels), ref, atol=1e-5, rtol=0):
                still.append(name)
            param.copy_(saved)
    assert still and all(n.endswith("self_attn.k_proj.bias") for n in still), still


@pytest.mark.parametrize("layout", ["A", "A'", "B", "C", "D"])
def test_layout_keys_and_tensors(model, out_root, layout):
    info = H.save_llava_layout(model, out_root / f"keys-{layout}", layout)
    written = H.read_checkpoint_dir(info["out_dir"])
    assert sorted(written) == info["keys"]
    patterns = [re.compile(p) for p in PATTERNS[layout]]
    counts = [0] * len(patterns)
    for key in written:
        hits = [i for i, p in enumerate(patterns) if p.fullmatch(key)]
        assert len(hits) == 1, f"{layout}: {key} matches {len(hits)} documented prefixes"
        counts[hits[0]] += 1
    assert counts == ([N_LM, N_PROJ, 1] if layout == "D" else [N_VISION, N_PROJ, N_LM, 1])

    memory = model.state_dict()
    for key, tensor in written.items():
        expected = memory[_to_memory_name(key, layout)]
        if layout == "D" and key in ("model.embed_tokens.weight", "lm_head.weight"):
            expected = expected[: model.config.image_token_index]
        assert tensor.dtype == torch.float32 and torch.equal(tensor, expected), key

    config = json.loads(Path(info["config"]).read_text())
    if layout == "D":
        assert not any("vision" in k for k in written)
        assert config["architectures"] == ["LlavaLlamaForCausalLM"]
    else:
        assert config["model_type"] == "llava" and "text_config" in config
        assert config["image_token_index"] == H.IMAGE_TOKEN_INDEX


@pytest.mark.parametrize("layout", ["A", "B", "C", "D"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_sharded_equals_single_file(model, out_root, layout, fmt):
    single = H.save_llava_layout(model, out_root / f"s1-{layout}-{fmt}", layout, fmt=fmt, shards=1,
                                 use_save_pretrained=False if layout == "C" else None)
    sharded = H.save_llava_layout(model, out_root / f"s3-{layout}-{fmt}", layout, fmt=fmt, shards=3)
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    assert [p.name for p in single["files"]] == [f"{stem}.{ext}"]
    assert [p.name for p in sharded["files"]] == [
        f"{stem}-{i:05d}-of-00003.{ext}" for i in (1, 2, 3)]
    assert single["index"] is None and not (single["out_dir"] / H._index_name(fmt)).exists()
    index = json.loads(sharded["index"].read_text())
    assert sharded["index"].name == f"{stem}.{ext}.index.json"
    assert set(index["weight_map"].values()) == {p.name for p in sharded["files"]}
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for t in H.read_checkpoint_dir(single["out_dir"]).values())
    a, b = H.read_checkpoint_dir(single["out_dir"]), H.read_checkpoint_dir(sharded["out_dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    configs = [json.loads(i["config"].read_text()) for i in (single, sharded)]
    for c in configs:
        c.pop("mm_vision_tower", None)  # D: the (different) clip dirs
    assert configs[0] == configs[1]


def test_layout_c_is_what_save_pretrained_writes(model, out_root):
    by_hand = H.save_llava_layout(model, out_root / "c-hand", "C", use_save_pretrained=False)
    native = H.save_llava_layout(model, out_root / "c-native", "C")  # model.save_pretrained
    a, b = H.read_checkpoint_dir(by_hand["out_dir"]), H.read_checkpoint_dir(native["out_dir"])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("vision_tower.embeddings.") for k in b)  # no vision_model. in 5.x
    assert json.loads(by_hand["config"].read_text()) == json.loads(native["config"].read_text())


@pytest.mark.parametrize(
    "layout,fmt,shards,extra",
    [
        ("A", "safetensors", 2, {}),
        ("A'", "bin", 1, {}),
        ("B", "safetensors", 1, {"position_ids": True}),
        ("B", "bin", 3, {}),
        ("C", "safetensors", 1, {}),  # model.save_pretrained itself
        ("C", "bin", 2, {}),
    ],
)
def test_hf_layouts_reload_in_transformers(
    model, inputs, ref_logits, out_root, layout, fmt, shards, extra
):
    info = H.save_llava_layout(model, out_root / f"reload-{layout}-{fmt}-{shards}", layout,
                               fmt=fmt, shards=shards, **extra)
    _reload_and_compare(info["out_dir"], inputs, ref_logits)


def test_layout_d_original_llava(model, inputs, ref_logits, out_root):
    n_text = model.config.image_token_index
    info = H.save_llava_layout(model, out_root / "d-llm", "D", fmt="bin", shards=2,
                               clip_dir=out_root / "d-clip")
    assert info["clip_dir"] == out_root / "d-clip" and info["text_vocab_size"] == n_text
    llm = H.read_checkpoint_dir(info["out_dir"])
    assert not any("vision" in k for k in llm)
    assert {k for k in llm if "mm_projector" in k} == {
        f"model.mm_projector.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    # The vocab excludes the image token (and llava-hf's pad / padding rows).
    assert llm["model.embed_tokens.weight"].shape[0] == llm["lm_head.weight"].shape[0] == n_text

    cfg = json.loads(info["config"].read_text())
    assert cfg["vocab_size"] == n_text and "text_config" not in cfg and "vision_config" not in cfg
    tc = model.config.text_config
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"],
            cfg["intermediate_size"], cfg["rms_norm_eps"], cfg["max_position_embeddings"]) == (
        tc.hidden_size, tc.num_attention_heads, tc.num_hidden_layers, tc.intermediate_size,
        tc.rms_norm_eps, tc.max_position_embeddings)
    assert cfg["mm_vision_tower"] == str(out_root / "d-clip")
    assert cfg["mm_hidden_size"] == model.config.vision_config.hidden_size
    assert (cfg["mm_projector_type"], cfg["mm_vision_select_layer"],
            cfg["mm_vision_select_feature"], cfg["image_aspect_ratio"],
            cfg["mm_use_im_start_end"]) == ("mlp2x_gelu", -2, "patch", "pad", False)
    assert (cfg["model_type"], cfg["architectures"], cfg["rope_theta"]) == (
        "llava_llama", ["LlavaLlamaForCausalLM"], 10000.0)

    # The CLIP tower: vision_model.* keys, CLIPVisionModel config; transformers loads it.
    clip = H.read_checkpoint_dir(info["clip_dir"])
    assert clip and all(k.startswith("vision_model.") for k in clip)
    clip_cfg = json.loads(info["clip_config"].read_text())
    assert clip_cfg["model_type"] == "clip_vision_model"
    assert (info["clip_dir"] / "preprocessor_config.json").is_file()
    tower, load_info = CLIPVisionModel.from_pretrained(info["clip_dir"], output_loading_info=True)
    assert not any(load_info.values()), load_info
    pixels = inputs[1]
    with torch.no_grad():
        ours = tower(pixels, output_hidden_states=True).hidden_states
        theirs = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states
    assert all(torch.equal(x, y) for x, y in zip(ours, theirs))

    # D + CLIP dir describe the whole model: rebuild llava-hf (padding rows zero) and compare.
    memory = {_to_memory_name(k, "D"): v for k, v in llm.items()}
    memory.update({"model.vision_tower." + k[len("vision_model."):]: v for k, v in clip.items()})
    for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        padded = torch.zeros(model.config.text_config.vocab_size, memory[key].shape[1])
        padded[:n_text] = memory[key]
        memory[key] = padded
    rebuilt = H.make_tiny_hf_llava(seed=123)
    rebuilt.load_state_dict(memory, strict=True)
    assert torch.equal(H.hf_logits(rebuilt, *inputs)[..., :n_text], ref_logits[..., :n_text])


def test_layout_d_variants(model, out_root):
    # The released liuhaotian/llava-v1.5-7b config (transformers 4.31 era).
    info = H.save_llava_layout(model, out_root / "dv-llm", "D", d_config_style="v1.5",
                               include_frozen_tower=True, clip_style="clip_model",
                               position_ids=True, dtype=torch.float16)
    cfg = json.loads(info["config"].read_text())
    assert cfg["model_type"] == "llava" and "rope_theta" not in cfg
    assert cfg["torch_dtype"] == "float16" and cfg["transformers_version"] == "4.31.0"
    llm = H.read_checkpoint_dir(info["out_dir"])
    assert all(t.dtype == torch.float16 for t in llm.values() if t.is_floating_point())
    frozen = [k for k in llm if "vision" in k]
    assert frozen
    assert all(k.startswith("model.vision_tower.vision_tower.vision_model.") for k in frozen)
    # Default clip dir is a sibling; clip_model style = a whole CLIPModel (openai/clip-vit-*).
    assert info["clip_dir"] == out_root / "dv-llm-clip"
    clip = H.read_checkpoint_dir(info["clip_dir"])
    assert "vision_model.embeddings.position_ids" in clip and "logit_scale" in clip
    assert json.loads(info["clip_config"].read_text())["model_type"] == "clip"
    _, load_info = CLIPModel.from_pretrained(info["clip_dir"], output_loading_info=True)
    assert not load_info["missing_keys"] and not load_info["mismatched_keys"]

    t5 = H.save_llava_layout(model, out_root / "d5-llm", "D", clip_style="transformers5")
    assert all(k.startswith(("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm."))
               for k in H.read_checkpoint_dir(t5["clip_dir"]))


def test_tiny_tokenizer(tmp_path):
    import sentencepiece as spm

    path = H.write_tiny_tokenizer(tmp_path / "tok")
    assert path == tmp_path / "tok" / "tokenizer.model"
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.get_piece_size() == H.TEXT_VOCAB == H.IMAGE_TOKEN_INDEX
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    assert sp.encode("A red cat", out_type=str)[0].startswith("\u2581")  # dummy prefix
    assert "<0xC3>" in sp.encode("\u00fc", out_type=str)  # byte fallback, no <unk>
    assert sp.piece_to_id("<image>") == sp.unk_id()
    assert H.write_tiny_tokenizer(tmp_path / "tok2").read_bytes() == path.read_bytes()


def test_inputs_and_placeholder_checks(model, inputs, ref_logits):
    ids, pixels = inputs
    n = H.num_image_tokens(model.config)
    assert ref_logits.shape == (*ids.shape, model.config.text_config.vocab_size)
    assert int((ids == model.config.image_token_index).sum()) == pixels.shape[0] * n
    assert int(ids.max()) <= model.config.image_token_index
    collapsed = H.collapse_image_tokens(ids, model.config.image_token_index, n)
    assert [int((r == H.ORIGINAL_IMAGE_TOKEN_INDEX).sum()) for r in collapsed] == [1, 1]
    assert [len(r) for r in collapsed] == [ids.shape[1] - n + 1] * 2
    with pytest.raises(ValueError, match="placeholders"):
        H.hf_logits(model, ids[:, :-1].clone().fill_(5), pixels)
    two_ids, two_px = H.make_inputs(
        model.config, batch_size=1, seq_len=30, images_per_row=2, seed=3)
    assert two_px.shape[0] == 2
    assert H.hf_logits(model, two_ids, two_px).shape == (1, 30, H.PADDED_VOCAB)
