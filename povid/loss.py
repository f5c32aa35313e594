"""POVID preference objectives on summed answer log-probabilities.

With ``r(y) = log pi_theta(y | x) - log pi_ref(y | x)`` (summed over answer tokens and ``</s>``):

- ``dpo``: text pairs only, ``f(r_w - r_text)``;
- ``povid`` (the paper, one sigmoid): ``f(alpha * r_w - (beta1 * r_text + beta2 * r_noise))``;
  examples without a noise answer drop the ``beta2`` term;
- ``povid_released`` (the released code): ``0.5 * f(r_w - r_text) + 0.5 * f(r_w - r_noise)``;
  examples without a noise answer keep only the text term.

``f`` is the pairwise loss on the scaled margin ``h``: ``sigmoid`` (DPO, with optional label
smoothing as in cDPO: ``-(1 - e) log s(beta h) - e log s(-beta h)``), ``ipo``
(``(h - 1 / (2 beta))^2``) or ``hinge`` (``relu(1 - beta h)``). An optional NLL term on the
chosen answer (mean per token) guards against likelihood collapse.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchtune.rlhf import get_batch_log_probs

__all__ = [
    "OBJECTIVES",
    "LOSS_TYPES",
    "PreferenceLogProbs",
    "POVIDLoss",
    "sequence_logprobs",
    "answer_logprobs",
]

OBJECTIVES = ("dpo", "povid", "povid_released")
# Old name -> current one (``povid_reference`` read as "reference model"; it is the released code's).
DEPRECATED_OBJECTIVES = {"povid_reference": "povid_released"}
LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed log-probability of each row's labelled tokens (labels are shifted inside)."""
    return get_batch_log_probs(logits.float(), labels, return_average_logprobs=False)


def answer_logprobs(
    logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, n_rows: int
) -> torch.Tensor:
    """Summed log-probability per row from logits at scored positions only.

    ``logits[i]`` (``[n, vocab]``) predicts ``targets[i]`` in row ``rows[i]``; rows without any
    scored position get 0. The same numbers as :func:`sequence_logprobs` on the full logits,
    up to float summation order.
    """
    picked = logits.float().log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)
    return picked.new_zeros(n_rows).index_add(0, rows, picked)


@dataclass
class PreferenceLogProbs:
    """Per-example summed log-probs. ``noise``/``ref_noise`` may hold NaN where an example has
    no noise answer; ``noise_mask`` says which examples have one."""

    chosen: torch.Tensor
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    noise: Optional[torch.Tensor] = None
    ref_noise: Optional[torch.Tensor] = None
    noise_mask: Optional[torch.Tensor] = None
    chosen_tokens: Optional[torch.Tensor] = None  # answer tokens per chosen row, for the NLL term


class POVIDLoss(nn.Module):
    """The preference objective, chosen and weighted by config; ``forward`` returns
    ``(loss, metrics)`` (an ``nn.Module``: no state is left behind for a later call to read).

    Args:
        objective: ``dpo``, ``povid`` or ``povid_released`` (``povid_reference``, its old name,
            still works with a deprecation warning).
        beta: inverse temperature of the log-ratio margin (0.1 in POVID).
        alpha, beta1, beta2: weights of the chosen, text and noise log-ratios (``povid`` only).
        loss_type: ``sigmoid``, ``ipo`` or ``hinge``.
        label_smoothing: cDPO smoothing of the sigmoid loss.
        chosen_nll_weight: weight of the per-token NLL of the chosen answer (0 = off).
    """

    def __init__(
        self,
        objective: str = "povid",
        beta: float = 0.1,
        alpha: float = 1.0,
        beta1: float = 1.0,
        beta2: float = 1.0,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        chosen_nll_weight: float = 0.0,
    ) -> None:
        super().__init__()
        if objective in DEPRECATED_OBJECTIVES:
            new = DEPRECATED_OBJECTIVES[objective]
            warnings.warn(f"objective {objective!r} is deprecated: use {new!r} (the same loss)",
                          DeprecationWarning, stacklevel=2)  # fmt: skip
            objective = new
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if not 0 <= label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
        self.objective = objective
        self.beta = beta
        self.alpha = alpha
        self.beta1 = beta1
        self.beta2 = beta2
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.chosen_nll_weight = chosen_nll_weight

    def extra_repr(self) -> str:
        return (f"objective={self.objective!r}, beta={self.beta}, alpha={self.alpha}, beta1={self.beta1}, "
                f"beta2={self.beta2}, loss_type={self.loss_type!r}, label_smoothing={self.label_smoothing}, "
                f"chosen_nll_weight={self.chosen_nll_weight}")  # fmt: skip

    @property
    def uses_noise(self) -> bool:
        """Whether the objective has a noise term at all."""
        return self.objective != "dpo"

    def pair_loss(self, margin: torch.Tensor) -> torch.Tensor:
        """``f(h)`` per example for an unscaled log-ratio margin ``h``."""
        if self.loss_type == "ipo":
            return (margin - 1 / (2 * self.beta)) ** 2
        if self.loss_type == "hinge":
            return torch.relu(1 - self.beta * margin)
        scaled = self.beta * margin
        eps = self.label_smoothing
        return -(1 - eps) * F.logsigmoid(scaled) - eps * F.logsigmoid(-scaled)

    def forward(self, lp: PreferenceLogProbs) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Mean loss over the batch, and the detached per-term values, rewards and accuracies."""
        r_w = lp.chosen - lp.ref_chosen
        r_text = lp.rejected - lp.ref_rejected
        has_noise = (
            lp.noise_mask
            if lp.noise_mask is not None and lp.noise is not None and self.uses_noise
            else torch.zeros_like(r_w, dtype=torch.bool)
        )
        r_noise = (
            torch.where(has_noise, lp.noise - lp.ref_noise, torch.zeros_like(r_w))
            if lp.noise is not None
            else torch.zeros_like(r_w)
        )
        text_term = self.pair_loss(r_w - r_text)
        noise_term = self.pair_loss(r_w - r_noise)
        if self.objective == "dpo":
            per_example = text_term
        elif self.objective == "povid":
            margin = self.alpha * r_w - (self.beta1 * r_text + self.beta2 * r_noise * has_noise)
            per_example = self.pair_loss(margin)
        else:
            per_example = torch.where(has_noise, 0.5 * text_term + 0.5 * noise_term, text_term)
        loss = per_example.mean()
        metrics = {
            "loss/preference": loss.detach(),
            "loss/text_term": text_term.mean().detach(),
            "rewards/chosen": (self.beta * r_w).mean().detach(),
            "rewards/rejected": (self.beta * r_text).mean().detach(),
            "rewards/accuracy": (r_w > r_text).float().mean().detach(),
            "rewards/margin": (self.beta * (r_w - r_text)).mean().detach(),
            "logps/chosen": lp.chosen.mean().detach(),
            "logps/rejected": lp.rejected.mean().detach(),
        }
        if has_noise.any():
            noisy = has_noise
            metrics.update(
                {
                    "loss/noise_term": noise_term[noisy].mean().detach(),
                    "rewards/noise": (self.beta * r_noise[noisy]).mean().detach(),
                    "rewards/noise_accuracy": (r_w[noisy] > r_noise[noisy]).float().mean().detach(),
                    "rewards/noise_margin": (self.beta * (r_w - r_noise)[noisy]).mean().detach(),
                    "logps/noise": lp.noise[noisy].mean().detach(),
                }
            )
        if self.chosen_nll_weight > 0:
            if lp.chosen_tokens is None:
                raise ValueError("chosen_nll_weight > 0 needs the chosen answers' token counts")
            nll = (-lp.chosen / lp.chosen_tokens.clamp(min=1)).mean()
            metrics["loss/chosen_nll"] = nll.detach()
            loss = loss + self.chosen_nll_weight * nll
        metrics["loss"] = loss.detach()
        return loss, metrics
