"""The output head on answer positions only equals full logits: log-probs, gradients, losses."""

import json
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn
from torchtune.modules import TiedLinear

import povid_dpo
from povid.loss import answer_logprobs, sequence_logprobs
from povid.model import lora_llava_1_5
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


# --- The recipe against its previous full-logits implementation, kept here as the reference.


def _full_logits_row_logps(self, model, features, batch, *, reference, online_noise, shared_noise_targets=None):
    logits = row_logits(model, batch.tokens, features, batch.row_image)
    logps = sequence_logprobs(logits, batch.labels)
    out = {kind: logps[rows] for kind, rows in batch.kind_rows.items()}
    noise_labels = None
    if online_noise:
        out["noise"], noise_labels = _full_logits_noise(
            self, model, logits[batch.chosen_rows], batch, reference=reference, shared=shared_noise_targets
        )
    return out, noise_labels


def _full_logits_noise(self, model, chosen_logits, batch, *, reference, shared):
    cfg = self.cfg.noise
    tokens, labels = batch.tokens[batch.chosen_rows], batch.labels[batch.chosen_rows]
    own_argmax = shared is None
    if own_argmax or cfg.condition == "noisy":
        with nullcontext() if cfg.condition == "noisy" and not reference else torch.no_grad():
            noisy_features = self._features(model, batch.noisy_images, reference=reference)
            noisy_logits = row_logits(model, tokens, noisy_features)
    if own_argmax:
        predicted = torch.full_like(labels, IGNORE)
        predicted[:, 1:] = noisy_logits.detach()[:, :-1].argmax(-1)
        noise_labels = torch.where(labels != IGNORE, predicted, labels)
    else:
        noise_labels = shared
    return sequence_logprobs(noisy_logits if cfg.condition == "noisy" else chosen_logits, noise_labels), noise_labels


@pytest.mark.parametrize(
    "config, overrides",
    [
        ("povid_tiny_lora", []),
        ("povid_tiny_lora", ["noise.source=online"]),
        ("povid_tiny_lora", ["noise.source=online", "noise.argmax=separate", "noise.condition=noisy"]),
        ("povid_tiny_full", ["noise.source=online", "loss.objective=povid_released"]),
    ],
)
def test_recipe_losses_equal_the_full_logits_recipe(
    tmp_path, tiny_checkpoint, preference_data, monkeypatch, config, overrides
):
    def run(out):
        povid_dpo.main(
            ["--config", config, f"checkpoint_dir={tiny_checkpoint}", f"data_file={preference_data}",
             f"output_dir={out}", "max_steps=4", "save_merged=false", *overrides]
        )  # fmt: skip
        return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]

    answer_only = run(tmp_path / "answer")
    monkeypatch.setattr(povid_dpo.POVIDDPORecipe, "_row_logps", _full_logits_row_logps)
    full = run(tmp_path / "full")
    assert len(answer_only) == len(full) == 4
    for new, old in zip(answer_only, full):
        for key in ("loss", "logps/chosen", "logps/rejected", "logps/noise", "rewards/noise"):
            if key in old:
                assert new[key] == pytest.approx(old[key], rel=1e-5, abs=1e-6), key
