"""A second change proposed for povid_dpo, measured by the benchmark (``--variant shared_prefix``).

Every answer row of an example repeats the same prompt: BOS, system prompt, the 576 image
placeholders (64 in the benchmark model) and the question. povid_dpo runs the LLM over that
prefix once per row (2 rows for DPO, 3 with noise answers), in the policy and again in the
reference pass. This variant packs an example into ONE sequence::

    [prompt][answer chosen][answer rejected][answer noise]

with RoPE positions restarting after the prompt for every answer (``input_pos``) and an
attention mask in which each answer sees the prompt and itself (causally) but not the other
answers. The first answer token of every row is predicted from the prompt's last position, the
others from the row's own positions; the output head runs only on those positions (as in
``_answer_head.py``). Log-probabilities are those of the row-by-row forward (losses agree with
the recipe's to ~1e-4 relative over a few steps, fp32 summation order); the prompt's activations
get the gradient of all rows. Noise scored on the noisy image (``noise.condition=noisy``) has
no shared image, so that case falls back to the answer-only head.

On CPU the boolean mask sends SDPA to its math kernel, which materialises the [heads, S, S]
attention (O(S^2) memory, slower than the flash kernel the causal rows use): it pays off here
only while the prompt is a large share of each row (LLaVA's 576 image tokens), and loses at
long answers (1024+ tokens, see bench_scaling.py). On GPU torchtune takes a flex-attention
``BlockMask`` for exactly this pattern (it is how it packs samples), keeping flash-style cost.
Installed by monkeypatching ``POVIDDPORecipe._row_logps`` in the benchmark's own process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

import _answer_head

IGNORE_INDEX = -100


@dataclass
class Pack:
    tokens: torch.Tensor  # [examples, S]
    positions: torch.Tensor  # [examples, S]
    mask: torch.Tensor  # [examples, S, S] bool, True = attend
    pred_example: torch.Tensor  # [n] which packed sequence predicts target k
    pred_index: torch.Tensor  # [n] from which position
    target_row: torch.Tensor  # [n] the original row of target k
    targets: torch.Tensor  # [n]


def pack_examples(tokens: torch.Tensor, labels: torch.Tensor, row_example: torch.Tensor, pad_id: int) -> Pack:
    """Pack the answer rows of each example behind one copy of their shared prompt."""
    owners = row_example.tolist()
    n_examples = max(owners) + 1
    seqs: List[list] = []
    poss: List[list] = []
    segments: List[list] = []
    pred_example, pred_index, target_row, targets = [], [], [], []
    for ex in range(n_examples):
        rows = [r for r, o in enumerate(owners) if o == ex]
        scored = [(labels[r] != IGNORE_INDEX).nonzero().flatten() for r in rows]
        prefix = int(scored[0][0])  # first scored token: the answer starts here
        for r, s in zip(rows, scored):
            if int(s[0]) != prefix or not torch.equal(tokens[r, :prefix], tokens[rows[0], :prefix]):
                raise ValueError("rows of an example do not share their prompt")
        seq = tokens[rows[0], :prefix].tolist()
        pos = list(range(prefix))
        segs = []
        for r, s in zip(rows, scored):
            end = int(s[-1]) + 1
            start = len(seq)
            seq += tokens[r, prefix:end].tolist()
            pos += list(range(prefix, end))
            segs.append((start, end - prefix))
            for t in range(prefix, end):
                if labels[r, t] == IGNORE_INDEX:
                    continue
                # token t is predicted from token t - 1: the prompt's last, or this segment's own
                pred_index.append(prefix - 1 if t == prefix else start + (t - 1 - prefix))
                pred_example.append(ex)
                target_row.append(r)
                targets.append(int(labels[r, t]))
        seqs.append(seq)
        poss.append(pos)
        segments.append((prefix, segs))
    width = max(len(s) for s in seqs)
    device = tokens.device
    packed = torch.full((n_examples, width), pad_id, dtype=torch.long)
    positions = torch.zeros((n_examples, width), dtype=torch.long)
    mask = torch.zeros((n_examples, width, width), dtype=torch.bool)
    for ex, (seq, pos, (prefix, segs)) in enumerate(zip(seqs, poss, segments)):
        packed[ex, : len(seq)] = torch.tensor(seq)
        positions[ex, : len(pos)] = torch.tensor(pos)
        mask[ex, :prefix, :prefix] = torch.ones(prefix, prefix, dtype=torch.bool).tril()
        for start, length in segs:
            mask[ex, start : start + length, :prefix] = True
            mask[ex, start : start + length, start : start + length] = torch.ones(length, length, dtype=torch.bool).tril()
        for j in range(len(seq), width):  # padding attends to itself only
            mask[ex, j, j] = True
    as_long = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    return Pack(
        packed.to(device), positions.to(device), mask.to(device),
        as_long(pred_example), as_long(pred_index), as_long(target_row), as_long(targets),
    )  # fmt: skip


def packed_hidden(model, pack: Pack, features: torch.Tensor) -> torch.Tensor:
    """Final-normed hidden states of the packed sequences (one image per sequence)."""
    with _answer_head.hidden_states_only(model):
        return model(
            pack.tokens, mask=pack.mask, input_pos=pack.positions,
            encoder_input={"image": {"features": features}},
        )  # fmt: skip


def install(recipe_cls) -> None:
    """Replace ``_row_logps``; online noise reuses the packed hidden states of chosen rows."""
    _answer_head.install(recipe_cls)  # noisy-image passes and condition=noisy use the answer head
    answer_head_row_logps = recipe_cls._row_logps

    def _row_logps(self, model, features, batch, *, reference: bool, online_noise: bool) -> Dict[str, torch.Tensor]:
        if self.cfg.noise.condition == "noisy":
            # Noise rows/answers scored on the noisy image do not share the prompt's image.
            return answer_head_row_logps(self, model, features, batch, reference=reference, online_noise=online_noise)
        if "_pack" not in batch:
            batch["_pack"] = pack_examples(batch["tokens"], batch["labels"], batch["row_example"], self.checkpointer.args.pad_token_id)
        pack = batch["_pack"]
        h = packed_hidden(model, pack, features)
        chosen = h[pack.pred_example, pack.pred_index]
        log_probs = model.decoder.output(chosen).float().log_softmax(-1)
        n_rows = batch["tokens"].shape[0]
        logps = _answer_head.summed_logps(log_probs, pack.target_row, pack.targets, n_rows)
        kinds = batch["row_kind"]
        out = {kind: logps[[i for i, k in enumerate(kinds) if k == kind]] for kind in set(kinds)}
        if online_noise:
            out["noise"] = self._packed_noise_logps(model, log_probs, pack, batch, reference=reference)
        return out

    def _packed_noise_logps(self, model, log_probs, pack: Pack, batch, *, reference: bool):
        kinds = batch["row_kind"]
        chosen_rows = [i for i, k in enumerate(kinds) if k == "chosen"]
        if reference and self.cfg.noise.argmax == "shared":
            noise_targets = batch["noise_targets"]
        else:
            tokens, labels = batch["tokens"][chosen_rows], batch["labels"][chosen_rows]
            rows, cols, _ = _answer_head.answer_positions(labels)
            with torch.no_grad():
                noisy = self._features(model, batch["noisy_images"], reference=reference)
                noisy_h = _answer_head.hidden(model, tokens, noisy, None)
                noise_targets = model.decoder.output(noisy_h[rows, cols]).argmax(-1)
            if not reference:
                batch["noise_targets"] = noise_targets
        # The chosen rows' predictions, in the same (row, position) order as the argmax.
        is_chosen = torch.isin(pack.target_row, torch.tensor(chosen_rows, device=pack.target_row.device))
        row_of = {r: i for i, r in enumerate(chosen_rows)}
        owner = torch.tensor([row_of[int(r)] for r in pack.target_row[is_chosen]], device=log_probs.device)
        return _answer_head.summed_logps(log_probs[is_chosen], owner, noise_targets, len(chosen_rows))

    recipe_cls._row_logps = _row_logps
    recipe_cls._packed_noise_logps = _packed_noise_logps
