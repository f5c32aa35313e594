"""The answer-only output head as first prototyped; ``povid_dpo`` now does this itself.

Kept because ``_shared_prefix.py`` builds on these helpers (and ``--variant answer_head`` still
installs it, now equivalent to the recipe). The recipe's version applies the head inside the
model's forward (``povid.training.output_at``), which FSDP2 needs; this one after it.

Before, povid_dpo computed the output head on every position of every row, in fp32
(``[rows, L, 32064]``: torchtune's decoder returns ``output(h).float()``), then a full
``log_softmax`` that autograd keeps for backward. Only answer positions are ever read (labels
are -100 on the system prompt, the question and the 576 image placeholders), so this variant:

1. runs the decoder with its ``unembed`` replaced by the final norm, i.e. gets the normed
   hidden states ``[rows, L, d]`` instead of logits;
2. gathers the positions whose next-token label is scored (``labels[:, 1:] != -100``) and
   applies the output projection to those only: ``[n_answer_tokens, vocab]``;
3. sums ``log_softmax`` at the labels per row (``index_add``), and takes the online-noise
   argmax the same way (only answer positions are ever scored).

Numerically it is the same computation restricted to the rows of the logit matrix that are
used: the first step's loss is identical and a few LoRA steps later losses agree to ~1e-4
relative (fp32 summation order), for dpo, povid and povid_released, dataset or online noise,
clean or noisy condition. It is installed by
monkeypatching ``POVIDDPORecipe._row_logps`` / ``_online_noise_logps`` in the benchmark's own
process only; the recipe file is not touched.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Dict, Optional

import torch

IGNORE_INDEX = -100


@contextmanager
def hidden_states_only(model):
    """Make ``model(...)`` return the final-normed hidden states instead of logits."""
    decoder = model.decoder
    # A plain function in the instance dict shadows TransformerDecoder.unembed (assigning the
    # norm module itself would register a submodule and leave the method in charge).
    decoder.unembed = lambda h: decoder.norm(h)
    try:
        yield
    finally:
        del decoder.unembed


def answer_positions(labels: torch.Tensor):
    """``(row index, position index, target)`` of every scored next-token prediction."""
    targets = labels[:, 1:]
    rows, cols = (targets != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols, targets[rows, cols]


def answer_log_softmax(model, hidden: torch.Tensor, labels: torch.Tensor):
    """``log_softmax`` of the output head at scored positions only: ``[n, vocab]`` fp32."""
    rows, cols, targets = answer_positions(labels)
    logits = model.decoder.output(hidden[rows, cols]).float()
    return logits.log_softmax(-1), rows, targets


def summed_logps(log_probs: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, n_rows: int):
    """Per-row sum of the log-probabilities of ``targets``."""
    picked = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    return torch.zeros(n_rows, dtype=picked.dtype, device=picked.device).index_add(0, rows, picked)


def hidden(model, tokens, features, row_image: Optional[torch.Tensor]):
    image = {"features": features} if row_image is None else {"features": features, "row_index": row_image}
    with hidden_states_only(model):
        return model(tokens, encoder_input={"image": image})


def install(recipe_cls) -> None:
    """Replace the two methods of ``POVIDDPORecipe`` that build logits."""

    def _row_logps(self, model, features, batch, *, reference: bool, online_noise: bool) -> Dict[str, torch.Tensor]:
        tokens, labels, row_image = batch["tokens"], batch["labels"], batch["row_image"]
        h = hidden(model, tokens, features, row_image)
        log_probs, rows, targets = answer_log_softmax(model, h, labels)
        logps = summed_logps(log_probs, rows, targets, tokens.shape[0])
        kinds = batch["row_kind"]
        out = {kind: logps[[i for i, k in enumerate(kinds) if k == kind]] for kind in set(kinds)}
        if online_noise:
            chosen_rows = [i for i, k in enumerate(kinds) if k == "chosen"]
            out["noise"] = self._online_noise_logps(model, h[chosen_rows], batch, chosen_rows, reference=reference)
        return out

    def _online_noise_logps(self, model, chosen_hidden, batch, chosen_rows, *, reference: bool):
        # Mirrors the recipe: one noisy pass serves the argmax and, if conditioned on it, scoring.
        cfg = self.cfg.noise
        tokens, labels = batch["tokens"][chosen_rows], batch["labels"][chosen_rows]
        rows, cols, _ = answer_positions(labels)
        own_argmax = not (reference and cfg.argmax == "shared")
        if own_argmax or cfg.condition == "noisy":
            with nullcontext() if cfg.condition == "noisy" and not reference else torch.no_grad():
                noisy_features = self._features(model, batch["noisy_images"], reference=reference)
                noisy_h = hidden(model, tokens, noisy_features, None)
        if own_argmax:
            with torch.no_grad():
                noise_targets = model.decoder.output(noisy_h[rows, cols].detach()).argmax(-1)
            if not reference:
                batch["noise_targets"] = noise_targets
        else:
            noise_targets = batch["noise_targets"]
        scored = noisy_h if cfg.condition == "noisy" else chosen_hidden
        log_probs = model.decoder.output(scored[rows, cols]).float().log_softmax(-1)
        return summed_logps(log_probs, rows, noise_targets, tokens.shape[0])

    recipe_cls._row_logps = _row_logps
    recipe_cls._online_noise_logps = _online_noise_logps
