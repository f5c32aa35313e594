"""DPO's reference model: its form follows from what trains, and it never moves with the policy."""

import pytest
import torch

from povid.model import llava_1_5, lora_llava_1_5
from povid.reference import ReferenceModel
from _tiny import tiny_llava_args
from povid.training import encode_images, image_encoder


def _images(args, n=2):
    torch.manual_seed(1)
    return torch.randn(n, 3, args.image_size, args.image_size)


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))


def test_lora_with_frozen_projector_shares_the_policys_features():
    args = tiny_llava_args(vocab_size=100)
    torch.manual_seed(0)
    policy = lora_llava_1_5(args, lora_rank=4, lora_alpha=8, projector_trainable=False)
    reference = ReferenceModel(policy, lora=True, projector_trainable=False)
    assert reference.shares_policy_features and reference.model is policy and reference.form == "adapters off"
    images = _images(args)
    assert torch.equal(reference.features(images), encode_images(policy, images))
    tokens = torch.randint(1, 90, (1, 6))
    adapters = [m for n, m in policy.named_modules() if n.endswith("lora_b")]
    for module in adapters:  # trained adapters: the policy moves, the reference does not
        torch.nn.init.normal_(module.weight)
    with torch.no_grad():
        moved = policy(tokens)
        with reference.scoring():
            scored = reference.model(tokens)
        for module in adapters:
            torch.nn.init.zeros_(module.weight)
        base = policy(tokens)
    assert not torch.allclose(moved, base) and torch.allclose(scored, base)


def test_trainable_projector_gets_a_frozen_copy():
    args = tiny_llava_args(vocab_size=100)
    torch.manual_seed(0)
    policy = lora_llava_1_5(args, lora_rank=4, lora_alpha=8, projector_trainable=True)
    reference = ReferenceModel(policy, lora=True, projector_trainable=True)
    assert not reference.shares_policy_features
    images = _images(args)
    before = reference.features(images)
    _perturb(image_encoder(policy).projector)  # the policy's projector trains
    assert torch.equal(reference.features(images), before)
    assert not torch.allclose(encode_images(policy, images), before)
    assert not reference.features(images).requires_grad


def test_full_fine_tuning_copies_and_can_release_the_copy():
    args = tiny_llava_args(vocab_size=100)
    torch.manual_seed(0)
    policy = llava_1_5(args)
    reference = ReferenceModel(policy, lora=False, projector_trainable=True)
    assert reference.model is not policy and not any(p.requires_grad for p in reference.model.parameters())
    images = _images(args)
    before = reference.features(images)
    _perturb(policy)
    assert torch.equal(reference.features(images), before)
    reference.release_copy()
    assert reference.frozen_copy is None and "released" in reference.form
    with pytest.raises(RuntimeError, match="released"):
        reference.model
