"""Shared-prompt packing gives the row-by-row log-probs and gradients (povid.packing)."""

import pytest
import torch
from torch import nn

import povid_dpo
from _recipes import recipe_after_setup
from povid.loss import answer_logprobs
from povid.model import lora_llava_1_5
from povid.packing import pack_shared_prompts, packed_answer_logits, shared_prompt_mask
from povid.training import answer_positions, answer_targets, encode_images, row_logits
from _tiny import tiny_llava_args

IGNORE = -100
PAD = 0


def _model() -> nn.Module:
    torch.manual_seed(0)
    args = tiny_llava_args(60, embed_dim=64, intermediate_dim=128, max_seq_len=96)
    model = lora_llava_1_5(args, lora_rank=4, lora_alpha=8, lora_dropout=0.0)
    for name, param in model.named_parameters():
        if "lora_b" in name:
            nn.init.normal_(param, std=0.05)
        param.requires_grad_("lora_" in name or "projector" in name)
    return model


def _batch(model: nn.Module):
    """Two examples of three rows (chosen, rejected, noise) and one row of its own (a noise
    row on its noisy image): prompts of two lengths, answers of different lengths, padding."""
    args = model.llava_args
    g = torch.Generator().manual_seed(1)
    n_img = args.num_image_tokens
    prompt_a = [1] + [args.image_token_id] * n_img + torch.randint(3, 58, (5,), generator=g).tolist()
    prompt_b = [1] + [args.image_token_id] * n_img + torch.randint(3, 58, (9,), generator=g).tolist()
    rows = [(prompt_a, 7, 0), (prompt_b, 4, 1), (prompt_a, 11, 0), (prompt_b, 9, 1), (prompt_a, 3, 0), (prompt_a, 6, 2)]
    width = max(len(p) + n for p, n, _ in rows) + 3
    tokens = torch.full((len(rows), width), PAD)
    labels = torch.full_like(tokens, IGNORE)
    for r, (prompt, n, _) in enumerate(rows):
        answer = torch.randint(3, 58, (n,), generator=g)
        answer[-1] = 2  # </s>
        tokens[r, : len(prompt)] = torch.tensor(prompt)
        tokens[r, len(prompt) : len(prompt) + n] = answer
        labels[r, len(prompt) : len(prompt) + n] = answer
    images = torch.randn(3, 3, args.image_size, args.image_size, generator=g)
    return tokens, labels, images, torch.tensor([img for _, _, img in rows])


def _logps_and_grads(model, packed: bool):
    tokens, labels, images, row_image = _batch(model)
    model.zero_grad()
    features = encode_images(model, images)
    positions = answer_positions(labels)
    if packed:
        logits = packed_answer_logits(model, pack_shared_prompts(tokens, labels, row_image, PAD), features)
    else:
        logits = row_logits(model, tokens, features, row_image, positions)
    logps = answer_logprobs(logits, positions[0], answer_targets(labels, positions), len(tokens))
    (logps * torch.tensor([1.0, -0.5, 2.0, 0.3, -1.0, 0.7])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


def test_packed_logprobs_and_gradients_equal_row_by_row():
    model = _model()
    rows, row_grads = _logps_and_grads(model, packed=False)
    packed, packed_grads = _logps_and_grads(model, packed=True)
    assert torch.allclose(packed, rows, rtol=1e-5, atol=1e-5), (packed - rows).abs().max()
    assert row_grads.keys() == packed_grads.keys()
    assert any("projector" in n for n in row_grads) and any("lora_" in n for n in row_grads)
    for name, grad in row_grads.items():
        assert torch.allclose(packed_grads[name], grad, rtol=1e-4, atol=1e-6), name


def test_rows_group_by_image_and_prompt_and_positions_continue_from_the_prompt():
    model = _model()
    tokens, labels, _, row_image = _batch(model)
    pack = pack_shared_prompts(tokens, labels, row_image, PAD)
    # Image 0 with prompt a (rows 0, 2, 4), image 1 with prompt b (rows 1, 3), image 2 alone.
    assert pack.image_index.tolist() == [0, 1, 2]
    real = (labels != IGNORE).sum(1)
    first = [int((labels[r] != IGNORE).nonzero()[0]) for r in range(len(labels))]
    assert pack.packed_tokens == first[0] + first[1] + first[5] + int(real.sum())
    # Group 0: the prompt, then each answer at the positions it has in its own row.
    seg = pack.segments[0]
    assert pack.input_pos[0, : first[0]].tolist() == list(range(first[0]))
    for k, (row, n) in enumerate([(0, 7), (2, 11), (4, 3)], start=1):
        where = (seg == k).nonzero().flatten()
        assert len(where) == n
        assert pack.input_pos[0, where].tolist() == list(range(first[row], first[row] + n))
        assert pack.tokens[0, where].tolist() == tokens[row, first[row] : first[row] + n].tolist()


def test_mask_lets_answers_see_the_prompt_and_themselves_only():
    model = _model()
    tokens, labels, _, row_image = _batch(model)
    pack = pack_shared_prompts(tokens, labels, row_image, PAD)
    mask = shared_prompt_mask(pack)
    seg = pack.segments[0]
    prompt = (seg == 0).nonzero().flatten()
    one, two = (seg == 1).nonzero().flatten(), (seg == 2).nonzero().flatten()
    assert mask[0][two[:, None], prompt[None, :]].all()  # an answer sees the whole prompt
    assert not mask[0][two[:, None], one[None, :]].any()  # never another answer
    own = mask[0][two[:, None], two[None, :]]
    assert torch.equal(own, torch.ones_like(own).tril())  # and itself causally
    assert not mask[0][prompt[:, None], one[None, :]].any()
    # Padding attends to padding only, so no softmax row is empty.
    assert mask.any(-1).all()


def test_a_row_without_answer_is_an_error():
    tokens = torch.ones(2, 6, dtype=torch.long)
    labels = torch.full_like(tokens, IGNORE)
    labels[0, 3:] = 1
    with pytest.raises(ValueError, match="row 1 has no scored answer token"):
        pack_shared_prompts(tokens, labels, torch.tensor([0, 0]), PAD)


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("povid_tiny_lora", []),
        ("povid_tiny_lora", ["noise.source=online"]),
        ("povid_tiny_lora", ["noise.condition=noisy"]),
        ("povid_tiny_lora", ["model.use_dora=true", "model.projector_trainable=true"]),
        ("povid_tiny_qlora", []),
        ("povid_tiny_full", ["noise.source=online", "noise.argmax=separate", "loss.objective=povid_released"]),
    ],
)
def test_recipe_packed_logprobs_and_loss_gradients_equal_row_by_row(
    tmp_path, tiny_checkpoint, preference_data, config, overrides
):
    results = {}
    for packing in ("none", "shared_prompt"):
        recipe = recipe_after_setup(
            povid_dpo.POVIDDPORecipe, config, tiny_checkpoint, preference_data, tmp_path / packing,
            "save_merged=false", f"packing={packing}", *overrides,
        )  # fmt: skip
        torch.manual_seed(3)
        with torch.no_grad():
            for param in recipe.model.parameters():
                if param.requires_grad:  # a policy away from its reference, as after training
                    param.add_(torch.randn_like(param) * 0.05)
        batch = next(iter(recipe.dataloader)).to(recipe.device, recipe.dtype)
        if packing == "shared_prompt":  # rows do share a pass: fewer sequences than rows
            assert len(recipe._pack(batch).image_index) < len(batch.tokens)
        logps = recipe.preference_logprobs(batch)
        loss, _ = recipe.loss_fn(logps)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in recipe.model.named_parameters() if p.grad is not None}
        results[packing] = (logps, loss.detach(), grads, len(batch.tokens))
        recipe.cleanup()
    (rows, loss_rows, grads_rows, _), (packed, loss_packed, grads_packed, _) = results["none"], results["shared_prompt"]
    for field in ("chosen", "rejected", "ref_chosen", "ref_rejected", "noise", "ref_noise"):
        a, b = getattr(rows, field), getattr(packed, field)
        assert (a is None) == (b is None), field
        if a is not None:
            assert torch.allclose(b.float(), a.float(), rtol=1e-5, atol=1e-4), (field, a, b)
    assert rows.noise is not None  # every case has a noise term
    assert torch.allclose(loss_packed, loss_rows, rtol=1e-5, atol=1e-6)
    assert grads_rows.keys() == grads_packed.keys() and grads_rows
    for name, grad in grads_rows.items():
        assert torch.allclose(grads_packed[name], grad, rtol=1e-3, atol=1e-6), name


def test_block_mask_gives_the_logits_of_the_dense_mask_through_torchtune_attention():
    """The flex-attention form of the mask (``block_mask=True``, what torchtune's attention
    hands to flex attention on a GPU) encodes the same pattern as the dense one. torchtune
    routes a ``BlockMask`` to its compiled flex attention only on CUDA, so here each attention
    layer gets eager flex attention for it, the same function uncompiled."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention
    from torchtune.modules import MultiHeadAttention

    def attention_call(q, k, v, mask, dropout_p, is_causal):
        assert isinstance(mask, BlockMask)
        return flex_attention(q, k, v, block_mask=mask)

    model = _model().eval()
    tokens, labels, images, row_image = _batch(model)
    pack = pack_shared_prompts(tokens, labels, row_image, PAD)
    with torch.no_grad():
        features = encode_images(model, images)
        dense = packed_answer_logits(model, pack, features)
        layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
        assert layers
        for layer in layers:
            layer._attention_call = attention_call
        flex = packed_answer_logits(model, pack, features, block_mask=True)
    assert flex.shape == dense.shape
    assert torch.allclose(flex, dense, rtol=1e-4, atol=1e-4), (flex - dense).abs().max()
