"""The output head on answer positions only equals full logits: log-probs, gradients, losses."""

import pytest
import torch
from torch import nn
from torchtune.modules import TiedLinear

import povid_dpo
from povid.loss import answer_logprobs, sequence_logprobs
from povid.model import lora_llava_1_5
from _recipes import recipe_after_setup
from _tiny import tiny_llava_args
from povid.training import answer_positions, answer_targets, encode_images, row_logits

IGNORE = -100


def _model(tied: bool = False) -> nn.Module:
    torch.manual_seed(0)
    args = tiny_llava_args(60, embed_dim=64, intermediate_dim=128, max_seq_len=64)
    model = lora_llava_1_5(args, lora_rank=4, lora_alpha=8, lora_dropout=0.0)
    for name, param in model.named_parameters():
        if "lora_b" in name:  # LoRA B starts at zero: make the adapters matter
            nn.init.normal_(param, std=0.05)
        param.requires_grad_("lora_" in name)
    if tied:
        # Tied input/output embeddings (llama3.2, qwen2, gemma): the head is not an nn.Module.
        del model.decoder.output
        model.decoder.output = TiedLinear(model.tok_embeddings)
    return model


def _batch(model: nn.Module):
    """Three rows over two images; answers of different lengths, right padding, -100 prompts."""
    args = model.llava_args
    generator = torch.Generator().manual_seed(1)
    length = args.num_image_tokens + 14
    tokens = torch.randint(1, 58, (3, length), generator=generator)
    tokens[:, 1 : 1 + args.num_image_tokens] = args.image_token_id
    labels = torch.full_like(tokens, IGNORE)
    spans = [(length - 8, length), (length - 5, length - 2), (length - 10, length - 4)]
    for row, (start, end) in enumerate(spans):
        labels[row, start:end] = tokens[row, start:end]
        tokens[row, end:] = 0  # padding
    images = torch.randn(2, 3, args.image_size, args.image_size, generator=generator)
    return tokens, labels, images, torch.tensor([0, 1, 0])


def _logps_and_grads(model, answer_only: bool):
    tokens, labels, images, row_image = _batch(model)
    model.zero_grad()
    features = encode_images(model, images)
    if answer_only:
        positions = answer_positions(labels)
        logits = row_logits(model, tokens, features, row_image, positions)
        assert logits.shape == (int((labels[:, 1:] != IGNORE).sum()), model.llava_args.vocab_size)
        logps = answer_logprobs(logits, positions[0], answer_targets(labels, positions), len(tokens))
    else:
        logps = sequence_logprobs(row_logits(model, tokens, features, row_image), labels)
    (logps * torch.tensor([1.0, -0.5, 2.0])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logps.detach(), grads


@pytest.mark.parametrize("tied", [False, True])
def test_answer_only_head_matches_full_logits_in_value_and_gradient(tied):
    model = _model(tied)
    full, full_grads = _logps_and_grads(model, answer_only=False)
    answer, answer_grads = _logps_and_grads(model, answer_only=True)
    assert torch.allclose(answer, full, rtol=1e-6, atol=1e-5)
    assert full_grads.keys() == answer_grads.keys() and len(full_grads) > 0
    for name, grad in full_grads.items():
        assert torch.allclose(answer_grads[name], grad, rtol=1e-5, atol=1e-7), name
    # The selection is scoped to one call: the model gives full logits again afterwards.
    tokens, _, images, row_image = _batch(model)
    assert row_logits(model, tokens, encode_images(model, images), row_image).dim() == 3


def test_answer_positions_are_shifted_by_one():
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, 7, IGNORE, IGNORE, IGNORE]])
    rows, cols = answer_positions(labels)
    assert rows.tolist() == [0, 0, 1] and cols.tolist() == [1, 2, 0]
    assert answer_targets(labels, (rows, cols)).tolist() == [5, 6, 7]


# --- The recipe's step forward against full logits computed here, by the definition.


def _full_logits(model, features_of, batch, *, condition: str, shared_targets=None):
    """Every row kind's summed log-probs from ``[rows, seq, vocab]`` logits, and the online
    noise answer (teacher-forced argmax on the noisy image) when the batch has noisy images
    of the chosen rows."""
    logits = row_logits(model, batch.tokens, features_of(batch.images), batch.row_image)
    logps = sequence_logprobs(logits, batch.labels)
    out = {kind: logps[rows] for kind, rows in batch.kind_rows.items()}
    targets = None
    if batch.noisy_images is not None and "noise" not in batch.kind_rows:
        tokens, labels = batch.tokens[batch.chosen_rows], batch.labels[batch.chosen_rows]
        noisy_logits = row_logits(model, tokens, features_of(batch.noisy_images))
        if shared_targets is None:
            predicted = torch.full_like(labels, IGNORE)
            predicted[:, 1:] = noisy_logits[:, :-1].argmax(-1)
            targets = torch.where(labels != IGNORE, predicted, labels)
        else:
            targets = shared_targets
        scored = noisy_logits if condition == "noisy" else logits[batch.chosen_rows]
        out["noise"] = sequence_logprobs(scored, targets)
    return out, targets


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("povid_tiny_lora", []),
        ("povid_tiny_lora", ["noise.source=online"]),
        ("povid_tiny_lora", ["noise.source=online", "noise.argmax=separate", "noise.condition=noisy"]),
        ("povid_tiny_full", ["noise.source=online", "loss.objective=povid_released"]),
    ],
)
def test_recipe_logprobs_equal_full_logits(tmp_path, tiny_checkpoint, preference_data, config, overrides):
    recipe = recipe_after_setup(
        povid_dpo.POVIDDPORecipe, config, tiny_checkpoint, preference_data, tmp_path, "save_merged=false", *overrides
    )
    with torch.no_grad():
        for name, param in recipe.model.named_parameters():
            if param.requires_grad:  # a policy away from its reference, as after training
                param.add_(torch.randn_like(param) * 0.05)
    batch = next(iter(recipe.dataloader)).to(recipe.device, recipe.dtype)
    got = recipe.preference_logprobs(batch)
    noise = recipe.cfg.noise
    with torch.no_grad():
        model = recipe.model
        policy, targets = _full_logits(model, lambda x: encode_images(model, x), batch, condition=noise.condition)
        reference = recipe.reference
        with reference.scoring():
            shared = targets if noise.source == "online" and noise.argmax == "shared" else None
            ref, _ = _full_logits(
                reference.model, reference.features, batch, condition=noise.condition, shared_targets=shared
            )
    recipe.cleanup()

    def close(new, old):
        assert torch.allclose(new.float(), old.float(), rtol=1e-5, atol=1e-4), (new, old)

    close(got.chosen, policy["chosen"])
    close(got.rejected, policy["rejected"])
    close(got.ref_chosen, ref["chosen"])
    close(got.ref_rejected, ref["rejected"])
    assert "noise" in policy and got.noise_mask is not None and bool(got.noise_mask.any())
    if noise.source == "online":
        close(got.noise, policy["noise"])
        close(got.ref_noise, ref["noise"])
    else:  # one dataset noise row per example that has one
        owners = batch.row_example[batch.noise_rows]
        close(got.noise[owners], policy["noise"])
        close(got.ref_noise[owners], ref["noise"])
    assert not torch.allclose(got.chosen, got.ref_chosen)  # the comparison sees the policy
