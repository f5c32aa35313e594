"""Memory model of a ``povid_dpo`` step: GB by component for a LLaVA-1.5 shape and a config.

Used to size GPUs for the shipped configs (``benchmarks/memory_model.py`` prints the table and
checks it against peak memory measured on CPU). The figures are what PyTorch allocates
(``torch.cuda.max_memory_allocated``, which the recipe logs as ``peak_memory_gb``); the CUDA
context and allocator slack come on top (typically 0.5-1 GB and 5-15 %).

Where the numbers come from:

- **Parameters** are counted on the model the recipe builds (``povid.model`` builders on the
  meta device, trainable set by ``povid.training.set_trainable``), so adapters, the projector,
  the frozen CLIP tail and the 32064-row vocabulary are exact. QLoRA stores the LoRA-wrapped LLM
  linears in torchao NF4: 4 bits + one int8 scaler per block of 64 + one fp32 factor per 256
  blocks = 0.5159 bytes per weight; everything else stays in ``dtype``.
- **Gradients and optimizer**: one gradient and two AdamW moments per trainable parameter, in
  the parameter's dtype (``torch.optim.AdamW`` keeps its state like the parameter). Trainable
  parameters are stored in ``trainable_dtype`` (fp32 by default: master weights, as DeepSpeed's
  bf16 mode keeps them) while the frozen rest is in ``dtype``; on one device autocast holds a
  ``dtype`` copy of each trainable weight during the forward (FSDP2 all-gathers in ``dtype``
  instead, counted with its buffers).
- **FSDP** (``world_size > 1``, ``shard_llava``): everything of the LLM (layers, embeddings,
  norm, output head) is sharded, the vision encoder and projector are replicated; two unsharded
  decoder layers are in flight (current + prefetched), for parameters and for gradients.
- **Activations** saved for backward by one torchtune Llama layer, per token, measured with
  ``torch.autograd.graph.saved_tensors_hooks`` on torchtune 0.6.1 and fitted exactly (integer
  coefficients, zero residual over five shapes) -- see ``_LAYER_BYTES``. With activation
  checkpointing a layer keeps only its input (``embed_dim`` values per token) and one layer's
  full activations exist while it is recomputed. Tokens are ``batch * rows * seq_len``: rows
  are padded to the longest, so ``seq_len`` is the padded row length (``max_seq_len`` at worst).
- **Logits**: X is one fp32 logit tensor of the scored positions. ``logits_positions="answer"``
  (what povid_dpo does, ``povid.training.output_at``) scores ``answer_len`` tokens per row;
  ``"all"`` every position (an upper bound, how povid_dpo worked before). The policy's
  ``log_softmax`` (X) is saved for backward; in flight at its own time: the policy's fp32 logits
  (X), the reference pass's logits and ``log_softmax`` (2 X; 3 X with every position, where
  torchtune's log-prob helper also makes a temperature-scaled copy), backward's two gradients
  (2 X); plus X / 2 for the bf16/fp16 copy the fp32 logits are cast from. The component is the
  saved X plus the largest of these (3 X, or 4 X with every position and a live reference).
- **Online noise** scores the chosen rows a second time: that ``log_softmax`` is saved too; the
  teacher-forced no-grad pass on the noisy image has one layer and its logits in flight.
- **Reference**: with LoRA the reference is the same weights with adapters off (nothing extra,
  except a frozen projector copy when the projector trains); full fine-tuning keeps a frozen copy
  of the whole model, freed once reference log-probs are precomputed (unless the noise is
  online, which needs a live reference). The ``reference`` component is these copies; the
  reference forward runs without grad (one layer in flight) and is counted in the forward phase.
- **Shared-prompt packing** (``packing="shared_prompt"``): the rows of an example are one
  sequence of ``prompt_len + rows * answer_len`` tokens instead of ``rows * seq_len``, for the
  layers and the reference pass alike (the online noise pass on the noisy image stays row by
  row). The boolean mask ``[batch, S, S]`` is kept once, and SDPA converts it to an additive
  mask in the compute dtype that every layer saves for its backward (measured on CPU with
  ``saved_tensors_hooks``; CUDA's memory-efficient kernel saves its bias the same way): with
  activation checkpointing only the recomputed layer's copy is alive.
- **Vision**: the CLIP tower runs without grad, once per image: one layer's activations in
  flight; the projected features are saved only when the projector trains.

**Phases.** The components do not peak together, so the total is the largest of the step's
three phases rather than their sum:

- *forward*: weights, AdamW state, what the policy forward saved, and the largest thing in
  flight after it (the reference pass: one layer and its logits; the online noise pass; the
  policy's own head);
- *backward*: the head first (its two logit-sized gradients next to everything saved), then the
  layers, which free their activations as their gradients arrive: the peak is at one end, all
  activations (+ the recomputed layer under checkpointing) or all gradients;
- *optimizer step*: gradients, and AdamW's temporary (the size of all trainable parameters with
  the multi-tensor step PyTorch uses on CUDA, of the largest tensor on CPU).

Gradients exist in the forward only under gradient accumulation (``zero_grad(set_to_none=True)``
frees them after each step). Checked against CPU runs in ``benchmarks/memory_model.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Sequence

import torch

from povid.model import LlavaArgs

__all__ = [
    "GB",
    "DTYPE_BYTES",
    "NF4_BYTES_PER_WEIGHT",
    "ParameterCounts",
    "count_parameters",
    "layer_activation_bytes",
    "estimate_memory",
]

GB = 1024**3
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# torchao NF4: 4-bit codes, int8 block scalers (block 64), fp32 factor per 256 scaler blocks.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
_LORA_ATTN = ("q_proj", "k_proj", "v_proj", "output_proj")

# Bytes saved for backward per token by one torchtune Llama layer (RMSNorm, RoPE attention with
# SDPA, SwiGLU MLP), fitted as  a*embed_dim + b*intermediate_dim + c*lora_rank + 4*heads + 4
# (the last two: fp32 attention log-sum-exp and RMSNorm statistics). Keys: (trains the base
# weights, bytes per element, LoRA dropout > 0). QLoRA (NF4 base) measured equal to LoRA.
_LAYER_BYTES = {
    # full fine-tuning: the norms also keep their normalised output for the weight gradient
    (True, 4, False): (40, 16, 0),
    (True, 2, False): (26, 8, 0),
    # LoRA: the adapters' down-projections keep their inputs; dropout adds a copy + mask per input
    (False, 4, False): (32, 16, 28),
    (False, 2, False): (18, 8, 14),
    (False, 4, True): (60, 20, 28),
    (False, 2, True): (32, 10, 14),
}


@dataclass
class ParameterCounts:
    """Parameter counts of the model povid_dpo builds, by what happens to them."""

    vision: int  # CLIP tower incl. the never-run tail (frozen, replicated under FSDP)
    projector: int
    llm_linear: int  # LLM linears that LoRA wraps (NF4 under QLoRA)
    llm_other: int  # embeddings, norms, output head, LLM linears without adapters
    adapters: int  # LoRA A/B (0 for full fine-tuning)
    trainable: int
    trainable_replicated: int  # trainable parameters FSDP does not shard (the projector)
    largest_layer: int  # parameters of one decoder layer (FSDP all-gather unit)
    largest_trainable: int  # the largest trainable tensor (AdamW's per-tensor temporaries)

    @property
    def total(self) -> int:
        return self.vision + self.projector + self.llm_linear + self.llm_other + self.adapters


def count_parameters(
    args: LlavaArgs,
    *,
    method: str = "lora",
    lora_rank: int = 128,
    lora_attn_modules: Sequence[str] = _LORA_ATTN,
    apply_lora_to_mlp: bool = True,
    apply_lora_to_output: bool = False,
    projector_trainable: bool = False,
) -> ParameterCounts:
    """Count parameters on the meta device with the recipe's own builders and trainable set."""
    from torchtune.modules.peft import LoRALinear

    from povid.model import llava_1_5, lora_llava_1_5
    from povid.training import set_trainable

    _check_method(method)
    with torch.device("meta"):
        if method == "full":
            model = llava_1_5(args)
        else:  # QLoRA is counted on the LoRA model; its NF4 bytes are applied by the caller
            model = lora_llava_1_5(
                args,
                lora_attn_modules=list(lora_attn_modules),
                apply_lora_to_mlp=apply_lora_to_mlp,
                apply_lora_to_output=apply_lora_to_output,
                lora_rank=lora_rank,
            )
    trainable_names = set_trainable(model, projector_trainable=projector_trainable)
    params = dict(model.named_parameters())
    adapters = {n for n in params if "lora_" in n or n.endswith(".magnitude")}
    wrapped = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, LoRALinear)}
    encoder = "encoders.image."
    projector = encoder + "projector."

    def total(names) -> int:
        return sum(params[n].numel() for n in names)

    vision = {n for n in params if n.startswith(encoder) and not n.startswith(projector)}
    proj = {n for n in params if n.startswith(projector)}
    llm = set(params) - vision - proj - adapters
    return ParameterCounts(
        vision=total(vision),
        projector=total(proj),
        llm_linear=total(llm & wrapped),
        llm_other=total(llm - wrapped),
        adapters=total(adapters),
        trainable=total(trainable_names),
        trainable_replicated=total(trainable_names & proj),
        largest_layer=max(sum(p.numel() for p in layer.parameters()) for layer in model.decoder.layers),
        largest_trainable=max((params[n].numel() for n in trainable_names), default=0),
    )


def layer_activation_bytes(
    args: LlavaArgs, *, method: str, dtype: str, lora_rank: int, lora_dropout: float
) -> int:
    """Bytes one decoder layer saves for backward per token (no activation checkpointing)."""
    _check_method(method)
    a, b, c = _LAYER_BYTES[(method == "full", DTYPE_BYTES[dtype], method != "full" and lora_dropout > 0)]
    return a * args.embed_dim + b * args.intermediate_dim + c * lora_rank + 4 * args.num_heads + 4


def _check_method(method: str) -> None:
    if method not in ("lora", "qlora", "full"):
        raise ValueError(f"method must be lora, qlora or full; got {method!r}")


def _parameter_bytes(counts: ParameterCounts, method: str, e: int, t: int, world_size: int) -> Dict[str, float]:
    """Bytes of weights per device: replicated encoder, sharded LLM; the trainable ones at ``t``
    bytes (+ the ``e``-byte autocast copies of them on one device)."""
    linear_bytes = NF4_BYTES_PER_WEIGHT if method == "qlora" else e
    sharded_trainable = counts.trainable - counts.trainable_replicated
    replicated = (counts.vision + counts.projector) * e + counts.trainable_replicated * (t - e)
    sharded = counts.llm_linear * linear_bytes + (counts.llm_other + counts.adapters) * e + sharded_trainable * (t - e)
    copies = counts.trainable * e if world_size == 1 and t != e else 0
    return {"replicated": replicated + copies, "sharded": sharded / world_size}


def estimate_memory(
    args: LlavaArgs,
    *,
    method: str = "lora",
    lora_rank: int = 128,
    batch_size: int = 1,
    seq_len: int = 1048,
    rows_per_example: int = 3,
    dtype: str = "bf16",
    activation_checkpointing: bool = True,
    world_size: int = 1,
    precomputed_reference: bool = False,
    online_noise: bool = False,
    lora_dropout: float = 0.05,
    lora_attn_modules: Sequence[str] = _LORA_ATTN,
    apply_lora_to_mlp: bool = True,
    apply_lora_to_output: bool = False,
    projector_trainable: bool = False,
    logits_positions: str = "all",
    answer_len: int = 256,
    trainable_dtype: str = "fp32",
    packing: str = "none",
    prompt_len: int = 630,
    gradient_accumulation_steps: int = 1,
    optimizer_foreach: bool = True,
) -> Dict[str, float]:
    """Peak memory of one povid_dpo training step per device, in GB, by component and by phase.

    Args:
        args: the LLaVA architecture (``povid.model.LLAVA_1_5_7B`` etc. or ``read_llava_args``).
        method: ``lora``, ``qlora`` (NF4 base) or ``full``.
        lora_rank: LoRA rank (ignored for ``full``).
        batch_size: examples per device per micro-batch.
        seq_len: padded row length in tokens (image placeholders included).
        rows_per_example: answer rows per example in the concatenated forward: 2 (chosen,
            rejected), 3 with noise answers from the dataset. Online noise keeps 2 rows.
        dtype: ``bf16``, ``fp16`` or ``fp32`` (weights, activations, adapters, optimizer).
        activation_checkpointing: per-layer checkpointing (``enable_activation_checkpointing``).
        world_size: FSDP2 ranks (the LLM is sharded, the vision encoder replicated).
        precomputed_reference: reference log-probs come from the cache (no reference forward).
            povid_dpo ignores the cache when the noise is online, and so does this model.
        online_noise: the noise answer is computed on the fly (``noise.source=online``).
        lora_dropout, lora_attn_modules, apply_lora_to_mlp, apply_lora_to_output,
            projector_trainable: as in the config.
        logits_positions: ``all`` (every position; an upper bound) or ``answer`` (head on answer
            tokens only, as povid_dpo does).
        answer_len: answer tokens per row, used with ``logits_positions="answer"``.
        trainable_dtype: dtype of the trainable parameters, their gradients and AdamW state.
        packing: ``none`` (row by row, rows padded to ``seq_len``) or ``shared_prompt`` (each
            example's rows behind one copy of its prompt, see :mod:`povid.packing`).
        prompt_len: tokens of the shared prompt (image placeholders included), with
            ``packing="shared_prompt"``; each row then has ``answer_len`` answer tokens.
        gradient_accumulation_steps: above 1 the gradients of earlier micro-batches are held
            through the next forward.
        optimizer_foreach: AdamW's multi-tensor step (PyTorch's default on CUDA) holds one
            temporary the size of the trainable parameters; the per-tensor step (the default
            on CPU) one the size of the largest.

    Returns:
        Components, each at its own high point: ``{"parameters", "gradients", "optimizer",
        "activations", "logits", "reference", "fsdp_buffers"}``; the totals of the step's three
        phases, ``"forward"`` (policy and reference passes), ``"backward"`` and
        ``"optimizer_step"``; and ``"total"``, the largest phase. The components do not all
        peak together (activations are freed while gradients grow), so ``total`` is less than
        their sum. In GB (1024**3 bytes).
    """
    for name, value in (("dtype", dtype), ("trainable_dtype", trainable_dtype)):
        if value not in DTYPE_BYTES:
            raise ValueError(f"{name} must be one of {sorted(DTYPE_BYTES)}, got {value!r}")
    if logits_positions not in ("all", "answer"):
        raise ValueError(f"logits_positions must be 'all' or 'answer', got {logits_positions!r}")
    if packing not in ("none", "shared_prompt"):
        raise ValueError(f"packing must be 'none' or 'shared_prompt', got {packing!r}")
    e, t = DTYPE_BYTES[dtype], DTYPE_BYTES[trainable_dtype]
    precomputed_reference = precomputed_reference and not online_noise
    counts = count_parameters(
        args, method=method, lora_rank=lora_rank, lora_attn_modules=lora_attn_modules,
        apply_lora_to_mlp=apply_lora_to_mlp, apply_lora_to_output=apply_lora_to_output,
        projector_trainable=projector_trainable,
    )  # fmt: skip
    weights = _parameter_bytes(counts, method, e, t, world_size)
    parameters = weights["replicated"] + weights["sharded"]
    sharded_trainable = counts.trainable - counts.trainable_replicated
    gradients = (counts.trainable_replicated + sharded_trainable / world_size) * t
    optimizer = 2 * gradients

    reference = 0.0  # what the reference holds for the whole run
    if method == "full" and not precomputed_reference:
        # A frozen copy in the compute dtype, sharded like the policy; freed after precompute.
        reference += sum(_parameter_bytes(counts, method, e, e, world_size).values())
    elif projector_trainable:
        reference += counts.projector * e
    fsdp = 0.0
    if world_size > 1:
        layer = counts.largest_layer * (NF4_BYTES_PER_WEIGHT if method == "qlora" else e)
        fsdp = 2 * layer + (2 * layer if method == "full" else 0)
    static = parameters + optimizer + reference + fsdp
    held_gradients = gradients if gradient_accumulation_steps > 1 else 0.0

    rows = batch_size * rows_per_example
    packed_len = prompt_len + rows_per_example * answer_len
    tokens = batch_size * packed_len if packing == "shared_prompt" else rows * seq_len
    act = _activations(
        args, tokens, method=method, dtype=dtype, lora_rank=lora_rank, lora_dropout=lora_dropout,
        activation_checkpointing=activation_checkpointing, images=batch_size,
        projector_trainable=projector_trainable,
        mask_bytes=batch_size * packed_len**2 if packing == "shared_prompt" else 0,
    )  # fmt: skip
    positions = seq_len if logits_positions == "all" else min(answer_len, seq_len)
    x = rows * positions * args.vocab_size * 4  # one fp32 logit tensor of the scored positions
    low = x / 2 if e < 4 else 0.0  # the dtype copy the fp32 logits are cast from
    # Saved to backward: the policy's log_softmax, and the chosen rows' again against the
    # online noise answer.
    logits_saved = x + (batch_size * positions * args.vocab_size * 4 if online_noise else 0.0)
    reference_layer = reference_logits = online_layer = online_logits = 0.0
    if not precomputed_reference:  # one layer in flight, then its logits and log_softmax
        # (every position: also the temperature-scaled copy torchtune's log-prob helper makes)
        reference_layer = _no_grad_pass_bytes(args, tokens, method, dtype, lora_rank)
        reference_logits = (3 if logits_positions == "all" else 2) * x + low
    if online_noise:  # teacher-forced on the noisy image, row by row: one layer, the argmax logits
        online_layer = _no_grad_pass_bytes(args, batch_size * seq_len, method, dtype, lora_rank)
        online_logits = batch_size * positions * args.vocab_size * 4
    policy_head = x + low  # the fp32 logits next to their saved log_softmax
    forward_transient = max(
        act["vision_in_flight"], policy_head, reference_layer + reference_logits, online_layer + online_logits
    )
    forward = static + held_gradients + act["saved"] + logits_saved + forward_transient
    # Backward: first the head (gradients of log_softmax and of the logits), then the layers,
    # freeing their activations as their gradients arrive: the peak is at one end.
    head_backward = static + held_gradients + act["saved"] + logits_saved + 2 * x + low
    layers_backward = static + act["recomputed"] + max(act["saved"] + held_gradients, gradients + act["outside"])
    backward = max(head_backward, layers_backward)
    # FSDP2 shards every tensor of the LLM, so the largest local one is a 1/world_size slice.
    temporary = gradients if optimizer_foreach else counts.largest_trainable * t / world_size
    optimizer_step = static + gradients + temporary

    out = {
        "parameters": parameters,
        "gradients": gradients,
        "optimizer": optimizer,
        "activations": act["saved"] + max(act["recomputed"], act["vision_in_flight"], reference_layer, online_layer),
        "logits": logits_saved + max(2 * x + low, policy_head, reference_logits, online_logits),
        "reference": reference,
        "fsdp_buffers": fsdp,
        "forward": forward,
        "backward": backward,
        "optimizer_step": optimizer_step,
    }
    out = {k: v / GB for k, v in out.items()}
    out["total"] = max(out["forward"], out["backward"], out["optimizer_step"])
    return out


def _activations(
    args: LlavaArgs, tokens: int, *, method: str, dtype: str, lora_rank: int, lora_dropout: float,
    activation_checkpointing: bool, images: int, projector_trainable: bool, mask_bytes: int,
) -> Dict[str, float]:  # fmt: skip
    """Bytes of the policy forward: ``saved`` for backward, ``recomputed`` (one layer in flight
    in backward under activation checkpointing), ``outside`` (saved outside the layers) and
    ``vision_in_flight`` (one CLIP layer, the tower runs without grad).

    A packed batch keeps its boolean mask (``mask_bytes``), and SDPA saves an additive copy in
    the compute dtype per layer: every layer's without checkpointing, the recomputed one's with.
    """
    e = DTYPE_BYTES[dtype]
    per_layer = layer_activation_bytes(args, method=method, dtype=dtype, lora_rank=lora_rank, lora_dropout=lora_dropout)
    if activation_checkpointing:
        layers = args.num_layers * args.embed_dim * e * tokens
        recomputed = per_layer * tokens + mask_bytes * e
    else:
        layers = args.num_layers * (per_layer * tokens + mask_bytes * e)
        recomputed = 0.0
    # Fused input embeddings and the final norm (input, and output for a trainable head).
    outside = tokens * args.embed_dim * e * (3 if method == "full" else 2) + mask_bytes
    if projector_trainable:  # projected features and the projector's hidden layer are kept
        outside += 3 * images * args.num_image_tokens * args.embed_dim * e
    return {
        "saved": layers + outside,
        "recomputed": recomputed,
        "outside": outside,
        "vision_in_flight": _vision_transient_bytes(args, images, e),
    }


def _vision_transient_bytes(args: LlavaArgs, images: int, e: int) -> float:
    """One CLIP layer's tensors for a batch of images (the tower runs without grad)."""
    n = args.num_image_tokens + 1
    return images * n * (6 * args.vision_embed_dim + 2 * args.vision_intermediate_dim) * e


def _no_grad_pass_bytes(args: LlavaArgs, tokens: int, method: str, dtype: str, lora_rank: int) -> float:
    """A forward without grad keeps no activations: about one layer's tensors are alive."""
    return layer_activation_bytes(args, method=method, dtype=dtype, lora_rank=lora_rank, lora_dropout=0.0) * tokens
