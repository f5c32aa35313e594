"""DPO's reference model as one object: which form it takes, its image features, how it scores.

The form follows from what trains, and nothing else decides it:

- LoRA, projector frozen: the policy with its adapters disabled. Tower and projector are
  frozen, so the policy's image features are the reference's too (one vision pass a step).
- LoRA, projector trainable: the policy with its adapters disabled, and a frozen copy of the
  projector taken before training (disabling adapters does not undo a projector's updates).
- Full fine-tuning: a frozen copy of the whole model. Once every reference log-prob comes from
  a cache (:attr:`ReferenceModel.cache`), :meth:`ReferenceModel.release_copy` frees it.
"""

from __future__ import annotations

import copy
import gc
from contextlib import AbstractContextManager, nullcontext
from typing import Dict, Optional

import torch
from torch import nn
from torchtune.modules.peft import disable_adapter

from povid.training import encode_images, image_encoder

__all__ = ["ReferenceModel"]


class ReferenceModel:
    """The reference of ``policy`` (see the module docstring for its three forms).

    ``cache``: precomputed reference log-probs per record id and row kind, or None; the recipe
    fills it and reads it, this object only carries it with the rest of the reference.
    """

    def __init__(self, policy: nn.Module, *, lora: bool, projector_trainable: bool) -> None:
        self.policy = policy
        # Copies are taken now, before training and before trainable weights are upcast.
        self.frozen_copy: Optional[nn.Module] = None
        self.frozen_projector: Optional[nn.Module] = None
        if not lora:
            self.frozen_copy = copy.deepcopy(policy).requires_grad_(False).eval()
        elif projector_trainable:
            self.frozen_projector = copy.deepcopy(image_encoder(policy).projector).requires_grad_(False)
        self.lora = lora
        self.released = False
        self.cache: Optional[Dict[str, Dict[str, float]]] = None

    @property
    def form(self) -> str:
        """A short description for logs."""
        if not self.lora:
            return "frozen copy" + (" (released: log-probs from the cache)" if self.released else "")
        return "adapters off" + (" + frozen projector copy" if self.frozen_projector is not None else "")

    @property
    def shares_policy_features(self) -> bool:
        """True when the policy's image features are the reference's (LoRA, projector frozen)."""
        return self.lora and self.frozen_projector is None

    @property
    def model(self) -> nn.Module:
        """The module that scores as the reference (inside :meth:`scoring`)."""
        if self.released:
            raise RuntimeError("the reference's frozen copy was released; only its cache is left")
        return self.frozen_copy if self.frozen_copy is not None else self.policy

    def scoring(self) -> AbstractContextManager:
        """Context in which :attr:`model` computes reference log-probs (adapters disabled for
        LoRA; nothing for a frozen copy)."""
        return nullcontext() if self.frozen_copy is not None else disable_adapter(self.policy)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The reference's projected image features of ``images`` (no gradient)."""
        if self.frozen_projector is not None:
            return self.frozen_projector(image_encoder(self.policy).image_features(images))
        return encode_images(self.model, images).detach()

    def release_copy(self) -> None:
        """Free a full fine-tuning run's frozen copy (every log-prob now comes from the cache)."""
        if self.frozen_copy is not None:
            self.frozen_copy = None
            self.released = True
            gc.collect()
