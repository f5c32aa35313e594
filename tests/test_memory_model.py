"""povid.memory: components checked against hand computation and against what autograd saves."""

import pytest
import torch

from povid.memory import (
    GB,
    NF4_BYTES_PER_WEIGHT,
    count_parameters,
    estimate_memory,
    layer_activation_bytes,
)
from povid.model import LLAVA_1_5_7B, LLAVA_1_5_13B, LlavaArgs

# LLaVA-1.5-7B by hand: Llama-2-7B with the 32064-row vocabulary, CLIP ViT-L/14-336, projector.
H, I, LAYERS, V = 4096, 11008, 32, 32064
LLM_LINEARS = LAYERS * (4 * H * H + 3 * H * I)  # q, k, v, o + gate, up, down
LLM_OTHER = 2 * V * H + LAYERS * 2 * H + H  # embeddings, lm_head, norms
PROJECTOR = 1024 * H + H + H * H + H
TOTAL_7B = 7_063_427_072  # = transformers' LlavaForConditionalGeneration count (README)
VISION = TOTAL_7B - LLM_LINEARS - LLM_OTHER - PROJECTOR
R = 128
ADAPTERS = LAYERS * R * (4 * (H + H) + 3 * (H + I))  # A: r x in, B: out x r


def test_parameter_groups_of_7b_match_hand_count():
    counts = count_parameters(LLAVA_1_5_7B, method="lora", lora_rank=R)
    assert counts.llm_linear == LLM_LINEARS == 6_476_005_376
    assert counts.llm_other == LLM_OTHER
    assert counts.projector == PROJECTOR
    assert counts.vision == VISION
    assert counts.adapters == counts.trainable == ADAPTERS == 319_815_680
    assert counts.total - counts.adapters == TOTAL_7B


def test_7b_lora_bf16_weights_grads_and_adamw():
    # fp32 master adapters (+ their bf16 autocast copies), fp32 gradients and AdamW moments
    est = estimate_memory(LLAVA_1_5_7B, method="lora", lora_rank=R, dtype="bf16")
    assert est["parameters"] == pytest.approx((TOTAL_7B * 2 + ADAPTERS * (4 + 2)) / GB)  # 14.94 GB
    assert est["gradients"] == pytest.approx(ADAPTERS * 4 / GB)
    assert est["optimizer"] == pytest.approx(2 * ADAPTERS * 4 / GB)
    phases = [est["forward"], est["backward"], est["optimizer_step"]]
    assert est["total"] == max(phases)
    components = ["parameters", "gradients", "optimizer", "activations", "logits", "reference", "fsdp_buffers"]
    # the activations are freed as the gradients arrive: the peak is below the components' sum
    assert est["total"] < sum(est[k] for k in components)
    pure = estimate_memory(LLAVA_1_5_7B, method="lora", lora_rank=R, dtype="bf16", trainable_dtype="bf16")
    assert pure["parameters"] == pytest.approx((TOTAL_7B + ADAPTERS) * 2 / GB)  # 13.75 GB
    assert pure["gradients"] == pytest.approx(ADAPTERS * 2 / GB)
    assert pure["optimizer"] == pytest.approx(2 * ADAPTERS * 2 / GB)


def test_qlora_stores_llm_linears_in_nf4():
    est = estimate_memory(LLAVA_1_5_7B, method="qlora", lora_rank=R, dtype="bf16")
    expected = LLM_LINEARS * NF4_BYTES_PER_WEIGHT + (TOTAL_7B - LLM_LINEARS) * 2 + ADAPTERS * (4 + 2)
    assert NF4_BYTES_PER_WEIGHT == pytest.approx(0.5159, abs=1e-4)
    assert est["parameters"] == pytest.approx(expected / GB)


def test_full_fsdp_shards_the_llm_and_replicates_the_vision_encoder():
    one = estimate_memory(LLAVA_1_5_7B, method="full", world_size=1, projector_trainable=True)
    eight = estimate_memory(LLAVA_1_5_7B, method="full", world_size=8, projector_trainable=True)
    llm = LLM_LINEARS + LLM_OTHER
    # what trains (LLM + projector) in fp32; on one device + its bf16 autocast copies
    assert one["parameters"] == pytest.approx((VISION * 2 + (PROJECTOR + llm) * (4 + 2)) / GB)
    assert eight["parameters"] == pytest.approx((VISION * 2 + PROJECTOR * 4 + llm * 4 / 8) / GB)
    assert eight["gradients"] == pytest.approx((PROJECTOR + llm / 8) * 4 / GB)
    assert eight["optimizer"] == pytest.approx(2 * eight["gradients"])
    cached = estimate_memory(LLAVA_1_5_7B, method="full", world_size=8, precomputed_reference=True)
    # the frozen copy is freed once reference log-probs are cached (no online noise)
    assert cached["reference"] == 0
    online = estimate_memory(
        LLAVA_1_5_7B, method="full", world_size=8, precomputed_reference=True, online_noise=True
    )
    # the frozen copy is in the compute dtype (bf16), sharded like the policy
    assert online["reference"] > ((VISION + PROJECTOR) * 2 + llm * 2 / 8) / GB * 0.99
    assert eight["fsdp_buffers"] > 0 == one["fsdp_buffers"]


def test_activations_and_logits_by_hand():
    kw = dict(method="lora", lora_rank=R, batch_size=1, seq_len=1048, rows_per_example=3, dtype="bf16")
    tokens = 3 * 1048
    per_layer = layer_activation_bytes(LLAVA_1_5_7B, method="lora", dtype="bf16", lora_rank=R, lora_dropout=0.05)
    assert per_layer == 32 * H + 10 * I + 14 * R + 4 * 32 + 4
    no_ac = estimate_memory(LLAVA_1_5_7B, activation_checkpointing=False, **kw)
    ac = estimate_memory(LLAVA_1_5_7B, activation_checkpointing=True, **kw)
    # without checkpointing every layer keeps everything: ~23 GB for 3 x 1048 tokens
    assert no_ac["activations"] > LAYERS * per_layer * tokens / GB > 20
    # with it a layer keeps its bf16 input, plus one layer being recomputed in backward; the
    # reference pass's layer in flight (no dropout) is over by then, so only the larger counts
    ref_layer = layer_activation_bytes(LLAVA_1_5_7B, method="lora", dtype="bf16", lora_rank=R, lora_dropout=0.0)
    assert ac["activations"] == pytest.approx(
        no_ac["activations"] - (LAYERS * per_layer + ref_layer - LAYERS * H * 2 - per_layer) * tokens / GB
    )
    x = tokens * V * 4  # fp32 logits of every position
    assert no_ac["logits"] == pytest.approx(4.5 * x / GB)
    # answer-only head: the saved log_softmax and backward's two at the peak (the reference
    # pass's pair is gone by then), plus the bf16 copy: 3.5 X with or without a reference pass
    answer = estimate_memory(LLAVA_1_5_7B, logits_positions="answer", answer_len=200, **kw)
    assert answer["logits"] == pytest.approx(3.5 * 3 * 200 * V * 4 / GB)
    # packing: the layers see one 630-token prompt + 3 answers instead of 3 padded rows, plus the
    # boolean mask and one bf16 additive copy of it per layer
    packed = estimate_memory(LLAVA_1_5_7B, activation_checkpointing=False, logits_positions="answer", answer_len=200,
                             packing="shared_prompt", prompt_len=630, **kw)  # fmt: skip
    rows = estimate_memory(LLAVA_1_5_7B, activation_checkpointing=False, logits_positions="answer", answer_len=200, **kw)
    packed_tokens = 630 + 3 * 200
    mask = packed_tokens**2 * (1 + LAYERS * 2)
    assert packed["logits"] == rows["logits"]
    # every layer, the fused embeddings and final norm, and the reference pass's layer in flight
    per_token = LAYERS * per_layer + 2 * H * 2 + ref_layer
    assert (packed["activations"] - rows["activations"]) * GB == pytest.approx(
        per_token * (packed_tokens - tokens) + mask
    )


def test_precompute_and_13b():
    live = estimate_memory(LLAVA_1_5_7B, method="lora", rows_per_example=2)
    cached = estimate_memory(LLAVA_1_5_7B, method="lora", rows_per_example=2, precomputed_reference=True)
    assert cached["reference"] == 0 == live["reference"]  # LoRA: the adapters switched off
    assert cached["forward"] < live["forward"]  # no reference pass in flight
    # no reference forward: one fp32 logit tensor fewer at the peak (3 + 1/2 instead of 4 + 1/2)
    assert cached["logits"] == pytest.approx(live["logits"] * 3.5 / 4.5)
    # online noise ignores the cache, like the recipe
    online = estimate_memory(LLAVA_1_5_7B, rows_per_example=2, precomputed_reference=True, online_noise=True)
    assert online["logits"] > live["logits"]  # the reference pass, and the chosen rows scored twice
    assert count_parameters(LLAVA_1_5_13B, method="full").total == 13_351_494_656


def test_phases_gradient_accumulation_and_the_optimizer_step():
    """Gradients count in the forward only when accumulated; AdamW's temporary depends on its mode;
    full fine-tuning without checkpointing peaks with its activations, not with them + gradients."""
    kw = dict(method="full", world_size=1, projector_trainable=True, activation_checkpointing=False, dtype="bf16")
    one = estimate_memory(LLAVA_1_5_7B, **kw)
    accumulated = estimate_memory(LLAVA_1_5_7B, gradient_accumulation_steps=4, **kw)
    assert accumulated["forward"] == pytest.approx(one["forward"] + one["gradients"])
    assert accumulated["optimizer_step"] == one["optimizer_step"]
    per_tensor = estimate_memory(LLAVA_1_5_7B, optimizer_foreach=False, **kw)
    counts = count_parameters(LLAVA_1_5_7B, method="full", projector_trainable=True)
    assert counts.largest_trainable == V * H  # the embeddings (and the output head)
    assert one["optimizer_step"] - per_tensor["optimizer_step"] == pytest.approx((counts.trainable - V * H) * 4 / GB)
    static = one["parameters"] + one["optimizer"] + one["reference"]
    # backward frees activations (~19 GB) as the fp32 gradients (~25 GB) arrive: not their sum
    assert static + one["gradients"] < one["backward"] < static + one["activations"] + one["gradients"]
    # 7B on one device: the multi-tensor AdamW step (gradients + a temporary as large) is the peak
    assert one["total"] == one["optimizer_step"] == pytest.approx(static + 2 * one["gradients"])


@pytest.mark.parametrize(
    "method, dtype, dropout",
    [("lora", torch.float32, 0.0), ("lora", torch.bfloat16, 0.05), ("full", torch.bfloat16, 0.0)],
)
def test_layer_coefficients_match_what_autograd_saves(method, dtype, dropout):
    """The fitted per-layer table against the tensors torchtune's layer actually saves."""
    from torchtune import training

    from povid.model import llava_1_5, lora_llava_1_5
    from povid.training import set_trainable

    args = LlavaArgs(
        vocab_size=512, embed_dim=192, num_layers=1, num_heads=6, num_kv_heads=6,
        intermediate_dim=320, vision_embed_dim=32, vision_num_layers=2, vision_num_heads=2,
        vision_intermediate_dim=64, image_size=28, patch_size=14, image_token_id=500,
    )  # fmt: skip
    with training.set_default_dtype(dtype):
        if method == "full":
            model = llava_1_5(args)
        else:
            model = lora_llava_1_5(args, lora_rank=4, lora_alpha=8, lora_dropout=dropout)
    set_trainable(model, projector_trainable=False)
    model.train()
    x = torch.randn(2, 16, args.embed_dim, dtype=dtype)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.decoder.layers[0](x)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    measured = sum(n for ptr, n in saved.items() if ptr not in weights)
    e = torch.finfo(dtype).bits // 8
    measured += 0 if x.untyped_storage().data_ptr() in saved else 2 * 16 * args.embed_dim * e
    name = {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    expected = layer_activation_bytes(args, method=method, dtype=name, lora_rank=4, lora_dropout=dropout)
    assert measured / 32 == expected
