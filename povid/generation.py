"""Batched generation with a KV cache for LLaVA (torchtune ``EarlyFusionModel``).

torchtune's ``generation.generate`` cannot pass images to the prefill step and samples without
top-p, so the loop is ours; masks and positions for left-padded batches come from torchtune.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from torch import nn
from torchtune.generation import (
    get_causal_mask_from_padding_mask,
    get_position_ids_from_padding_mask,
)
from torchtune.modules.common_utils import delete_kv_caches

__all__ = ["SamplingParams", "sample_next_token", "generate", "quantize_for_inference"]


@dataclass
class SamplingParams:
    """Decoding settings. ``temperature == 0`` means greedy (argmax)."""

    max_new_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: Optional[int] = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or null, got {self.top_k}")


def sample_next_token(
    logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Pick the next token per row of ``logits`` ``[b, vocab]``: greedy, or temperature sampling
    restricted by top-k and then top-p (nucleus)."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.size(-1):
        kth = torch.topk(logits, params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token once the mass before it already reaches top_p; the top token always stays.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    images: Optional[torch.Tensor],
    *,
    params: SamplingParams,
    eos_id: int,
    pad_id: int = 0,
    image_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
) -> List[List[int]]:
    """Generate continuations for a batch of tokenized prompts.

    Args:
        model: an ``EarlyFusionModel`` LLaVA (or any torchtune decoder with the same forward).
        prompts: token ids per row, image placeholders already expanded.
        images: ``[n_images, 3, H, W]`` for all placeholder blocks of the batch, in row-major
            order, or None for text-only prompts.
        params: decoding settings.
        eos_id: generation of a row stops after this id (it is not returned).
        pad_id: id used for left padding (never attended to).
        image_token_id: this id is never sampled: a generated placeholder would have no image.
        generator: random generator for sampling (seeded by the caller).

    Returns:
        The generated ids per row, without the prompt and without the EOS.
    """
    if not prompts:
        return []
    device = next(model.parameters()).device
    batch = len(prompts)
    prompt_len = max(len(p) for p in prompts)
    total_len = prompt_len + params.max_new_tokens
    decoder = getattr(model, "decoder", model)
    if total_len > decoder.max_seq_len:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({params.max_new_tokens}) exceeds the "
            f"model's context of {decoder.max_seq_len} tokens"
        )

    tokens = torch.full((batch, prompt_len), pad_id, dtype=torch.long, device=device)
    padding_mask = torch.zeros((batch, total_len), dtype=torch.bool, device=device)
    for row, prompt in enumerate(prompts):
        tokens[row, prompt_len - len(prompt) :] = torch.tensor(prompt, device=device)
        padding_mask[row, prompt_len - len(prompt) :] = True
    masks = get_causal_mask_from_padding_mask(padding_mask, target_seq_len=total_len)
    positions = get_position_ids_from_padding_mask(padding_mask)

    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    # Size the cache for this batch only: the decoder's own max_seq_len (4096 for LLaVA-1.5) would
    # allocate far more memory than a caption needs.
    if decoder.caches_are_setup():
        delete_kv_caches(model)
    decoder.setup_caches(batch, dtype, decoder_max_seq_len=total_len)
    try:
        encoder_input = {"image": {"images": images.to(device, dtype)}} if images is not None else None
        logits = model(
            tokens,
            mask=masks[:, :prompt_len],
            encoder_input=encoder_input,
            input_pos=positions[:, :prompt_len],
        )[:, -1]
        generated = torch.empty((batch, 0), dtype=torch.long, device=device)
        done = torch.zeros(batch, dtype=torch.bool, device=device)
        for step in range(params.max_new_tokens):
            if image_token_id is not None and image_token_id < logits.size(-1):
                logits[:, image_token_id] = float("-inf")
            next_token = sample_next_token(logits, params, generator)
            next_token = next_token.masked_fill(done, pad_id)
            generated = torch.cat([generated, next_token[:, None]], dim=1)
            done |= next_token == eos_id
            if done.all() or step == params.max_new_tokens - 1:
                break
            pos = prompt_len + step
            logits = model(
                next_token[:, None],
                mask=masks[:, pos : pos + 1],
                input_pos=positions[:, pos : pos + 1],
            )[:, -1]
    finally:
        delete_kv_caches(model)

    outputs = []
    for row in generated.tolist():
        outputs.append(row[: row.index(eos_id)] if eos_id in row else row)
    return outputs


def quantize_for_inference(model: nn.Module, mode: Optional[str]) -> nn.Module:
    """Weight-only quantization of the LLM's linear layers with torchao (``int8`` or ``int4``).

    The vision tower and projector stay in full precision: they are small and their outputs feed
    every image token. ``int4`` uses torchao's tinygemm kernels, which need a CUDA device and
    bf16 weights.
    """
    if mode in (None, "none"):
        return model
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    configs = {"int8": Int8WeightOnlyConfig, "int4": Int4WeightOnlyConfig}
    if mode not in configs:
        raise ValueError(f"quantization must be one of none, int8, int4; got {mode!r}")
    decoder = getattr(model, "decoder", model)
    quantize_(decoder, configs[mode](), filter_fn=lambda m, _: isinstance(m, nn.Linear))
    return model
