"""Builders: exact parameter counts at 7B/13B, LoRA/QLoRA/DoRA knobs, architecture from config.json."""

import pytest
import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from povid.model import (
    llava_1_5_13b,
    llava_1_5_7b,
    llava_from_checkpoint,
    lora_llava_1_5,
    qlora_llava_1_5_7b,
    read_llava_args,
)
from _tiny import tiny_llava_args


def _hf_param_count(hidden: int, layers: int, heads: int, intermediate: int) -> int:
    vision = CLIPVisionConfig(
        hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
        image_size=336, patch_size=14, projection_dim=768,
    )  # fmt: skip
    text = LlamaConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, vocab_size=32064, max_position_embeddings=4096,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlavaForConditionalGeneration(
            LlavaConfig(vision_config=vision, text_config=text, image_token_index=32000)
        )
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "builder, shape",
    [(llava_1_5_7b, (4096, 32, 32, 11008)), (llava_1_5_13b, (5120, 40, 40, 13824))],
)
def test_parameter_count_equals_transformers(builder, shape):
    with torch.device("meta"):
        ours = sum(p.numel() for p in builder().parameters())
    assert ours == _hf_param_count(*shape)
    if builder is llava_1_5_7b:
        assert 7.05e9 < ours < 7.07e9


def test_qlora_7b_quantizes_llm_linears_only():
    with torch.device("meta"):
        model = qlora_llava_1_5_7b()
    from torchao.dtypes.nf4tensor import NF4Tensor

    assert isinstance(model.decoder.layers[0].attn.q_proj.weight, NF4Tensor)
    assert isinstance(model.decoder.layers[0].mlp.w1.weight, NF4Tensor)
    assert not isinstance(model.encoders["image"].projector.linear_1.weight, NF4Tensor)
    assert not isinstance(model.decoder.output.weight, NF4Tensor)


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_knobs_and_projector_switch():
    args = tiny_llava_args(vocab_size=100)
    model = lora_llava_1_5(
        args, lora_attn_modules=["q_proj", "v_proj"], apply_lora_to_mlp=False, lora_rank=4,
        lora_alpha=8, use_dora=True, projector_trainable=True,
    )  # fmt: skip
    names = {n for n, _ in model.named_parameters()}
    assert any("attn.q_proj.lora_a" in n for n in names)
    assert any("attn.q_proj.magnitude" in n for n in names)
    assert not any("k_proj.lora_a" in n or "mlp.w1.lora_a" in n for n in names)
    trainable = _trainable(model)
    assert {n for n in trainable if "projector" in n} == {
        f"encoders.image.projector.linear_{i}.{k}" for i in (1, 2) for k in ("weight", "bias")
    }
    assert not any(n.startswith("encoders.image.clip") for n in trainable)
    frozen_projector = lora_llava_1_5(args, lora_rank=4, lora_alpha=8)
    assert not any("projector" in n for n in _trainable(frozen_projector))


def test_architecture_from_config_json(tiny_checkpoint):
    args = read_llava_args(tiny_checkpoint)
    assert args == tiny_llava_args(args.image_token_id)
    model = llava_from_checkpoint(tiny_checkpoint)
    assert model.llava_args.num_image_tokens == (args.image_size // args.patch_size) ** 2


def test_config_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_llava_args(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path / "config.json")):
        read_llava_args(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ValueError, match="not a LLaVA config"):
        read_llava_args(tmp_path)
