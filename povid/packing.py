"""Shared-prompt packing: the answer rows of one image and prompt in one sequence.

In LLaVA-1.5 every answer row of a preference example repeats the same prompt (BOS, system
prompt, 576 image placeholders, the question: ~630 tokens) before an answer of 100 to 250
tokens. Row by row, the LLM runs that prompt once per row: twice for DPO, three times for
POVID, and again in the reference pass. Packed, each group of rows that share an image and a
prompt becomes ONE sequence::

    [prompt][answer 1][answer 2][answer 3]

in which every answer attends to the whole prompt and causally to itself, never to another
answer, and its RoPE positions continue from the prompt's end as in its own row. The logits
at the positions that predict answer tokens are then those of the row-by-row forward (up to
fp32 summation order), and the prompt's activations receive the gradient of every row.

The mask is a dense boolean ``[groups, S, S]`` by default. On CPU (torch 2.14) SDPA takes its
fused flash kernel for a boolean mask (0.037 s against the math kernel's 0.093 s for forward +
backward at 512 tokens, README "povid_dpo"), but computes every block; on a GPU
with flex attention a ``BlockMask`` of the same pattern (``block_mask=True``) is what torchtune
uses for its own sample packing and skips the masked blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

import torch
from torch import nn

from povid.training import Positions, answer_positions, output_at
from povid_data.transforms import IGNORE_INDEX

PROMPT_SEGMENT = 0
PAD_SEGMENT = -1


@dataclass(frozen=True)
class SharedPromptPack:
    """Rows packed behind one copy of their shared prompt.

    Attributes:
        tokens: ``[groups, S]`` packed token ids (right-padded with the pad id).
        input_pos: ``[groups, S]`` RoPE positions: the prompt's ``0..P-1``, then each answer
            from ``P`` on, exactly as in its own row.
        segments: ``[groups, S]`` 0 for the prompt, ``k >= 1`` for the k-th answer, -1 padding.
        image_index: ``[groups]`` the image (an index into the per-image features) of each group.
        positions: ``(group, index)`` of the packed position predicting each scored answer token,
            in the order :func:`povid.training.answer_positions` gives for the unpacked rows.
    """

    tokens: torch.Tensor
    input_pos: torch.Tensor
    segments: torch.Tensor
    image_index: torch.Tensor
    positions: Positions

    @property
    def packed_tokens(self) -> int:
        """Non-padding tokens of the packed batch (what the LLM computes on)."""
        return int((self.segments != PAD_SEGMENT).sum())


def _answer_span(labels_row: torch.Tensor, row: int) -> Tuple[int, int]:
    """``(first, end)``: the row's first scored label and one past its last."""
    scored = (labels_row != IGNORE_INDEX).nonzero().flatten()
    if len(scored) == 0:
        raise ValueError(f"row {row} has no scored answer token: nothing to pack")
    return int(scored[0]), int(scored[-1]) + 1


def pack_shared_prompts(
    tokens: torch.Tensor, labels: torch.Tensor, row_image: Optional[torch.Tensor], pad_id: int
) -> SharedPromptPack:
    """Pack rows that share an image and a prompt into one sequence per group.

    Args:
        tokens: ``[rows, L]`` right-padded token ids.
        labels: ``[rows, L]``, ``-100`` everywhere but the answer tokens; a row's prompt is
            everything before its first scored label.
        row_image: ``[rows]`` the image index of each row (``None``: one image per row, so no
            two rows share and nothing is gained).
        pad_id: token id for padding.

    Rows of one image whose prompts differ go to separate groups, so the result is exact for
    any batch; only rows with both the same image and the same prompt tokens share a pass.
    """
    rows = tokens.shape[0]
    images = row_image.tolist() if row_image is not None else list(range(rows))
    spans = [_answer_span(labels[r], r) for r in range(rows)]
    groups: Dict[Tuple[int, Tuple[int, ...]], List[int]] = {}
    for r, (first, _end) in enumerate(spans):
        groups.setdefault((images[r], tuple(tokens[r, :first].tolist())), []).append(r)

    seqs: List[List[int]] = []
    poss: List[List[int]] = []
    segs: List[List[int]] = []
    group_image: List[int] = []
    group_of_row = [0] * rows
    shift_of_row = [0] * rows  # packed index = row index + shift, for answer positions
    for g, ((image, prompt), members) in enumerate(groups.items()):
        seq, pos, seg = list(prompt), list(range(len(prompt))), [PROMPT_SEGMENT] * len(prompt)
        for k, r in enumerate(members, start=1):
            first, end = spans[r]
            group_of_row[r], shift_of_row[r] = g, len(seq) - first
            seq += tokens[r, first:end].tolist()
            pos += list(range(first, end))
            seg += [k] * (end - first)
        seqs.append(seq)
        poss.append(pos)
        segs.append(seg)
        group_image.append(image)

    width = max(len(s) for s in seqs)
    device = tokens.device

    def padded(values: List[List[int]], fill: int) -> torch.Tensor:
        return torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long, device=device)

    row_pos, col_pos = answer_positions(labels)
    first_of_row = torch.tensor([s[0] for s in spans], device=device)
    group = torch.tensor(group_of_row, device=device)[row_pos]
    # The first answer token is predicted from the prompt's last position (shared by the
    # group); every later one from the row's own segment.
    in_answer = col_pos >= first_of_row[row_pos]
    index = torch.where(in_answer, col_pos + torch.tensor(shift_of_row, device=device)[row_pos], col_pos)
    return SharedPromptPack(
        tokens=padded(seqs, pad_id),
        input_pos=padded(poss, 0),
        segments=padded(segs, PAD_SEGMENT),
        image_index=torch.tensor(group_image, dtype=torch.long, device=device),
        positions=(group, index),
    )


def _attends(seg_q: torch.Tensor, seg_kv: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """Whether a query attends to a key: causally, within the prompt or its own answer segment,
    and from an answer to the whole prompt; padding only to padding (no softmax row is empty)."""
    same = seg_kv == seg_q
    prompt_from_answer = (seg_kv == PROMPT_SEGMENT) & (seg_q != PAD_SEGMENT)
    return (kv_idx <= q_idx) & (same | prompt_from_answer)


def shared_prompt_mask(pack: SharedPromptPack, *, block_mask: bool = False) -> Union[torch.Tensor, Any]:
    """The attention mask of ``pack``: a boolean ``[groups, S, S]`` (True = attend), or with
    ``block_mask`` a flex-attention ``BlockMask`` of the same pattern (CUDA; torchtune's
    attention then calls flex attention)."""
    segments = pack.segments
    groups, width = segments.shape
    if block_mask:
        from torch.nn.attention.flex_attention import create_block_mask

        def mask_mod(b, _h, q_idx, kv_idx):
            return _attends(segments[b, q_idx], segments[b, kv_idx], q_idx, kv_idx)

        return create_block_mask(mask_mod, groups, None, width, width, device=segments.device)
    idx = torch.arange(width, device=segments.device)
    return _attends(segments[:, :, None], segments[:, None, :], idx[None, :, None], idx[None, None, :])


def packed_answer_logits(
    model: nn.Module, pack: SharedPromptPack, features: torch.Tensor, *, block_mask: bool = False
) -> torch.Tensor:
    """Logits ``[n, vocab]`` at the positions predicting each scored answer token, in the order
    of :func:`povid.training.answer_positions` over the unpacked rows, from one forward over
    the packed groups. ``features``: per-image projected features; each group uses its image's."""
    mask = shared_prompt_mask(pack, block_mask=block_mask)
    image = {"features": features, "row_index": pack.image_index}
    with output_at(model, pack.positions):
        return model(pack.tokens, mask=mask, input_pos=pack.input_pos, encoder_input={"image": image})
