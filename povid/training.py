"""Pieces the training recipes share and torchtune lacks for a fused vision-language model.

Kept as small functions so a recipe reads top to bottom: which parameters train, how a batch of
answer rows is scored with one vision pass, the online noise answer, FSDP2 sharding that leaves
the (frozen) vision tower replicated, metrics to JSONL, and recipe-state files for resuming.
"""

from __future__ import annotations

import json
import os
import hashlib
import resource
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Set, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torchtune.modules.model_fusion import get_fusion_params
from torchtune.modules.peft import get_adapter_params, set_trainable_params
from torchtune.utils import get_logger

from povid_data.transforms import IGNORE_INDEX

# The recipes' logger (torchtune's, with its stream handler), so these lines print with theirs.
_log = get_logger("INFO")

__all__ = [
    "StepCheckpoints",
    "TrainingLog",
    "cosine_schedule_with_warmup_ratio",
    "setup_profiler",
    "plan_run",
    "is_lora_model",
    "set_trainable",
    "built_projector_trainable",
    "lora_rank_alpha",
    "trainable_state_keys",
    "upcast_trainable",
    "mixed_precision",
    "disable_dropout",
    "run_length",
    "image_encoder",
    "encode_images",
    "Positions",
    "answer_positions",
    "answer_targets",
    "output_at",
    "row_logits",
    "answer_token_counts",
    "shard_llava",
    "all_reduce_replicated_grads",
    "clip_grad_norm",
    "peak_memory_gb",
    "MetricsJsonl",
    "timed_batches",
    "latest_checkpoint",
    "answer_cross_entropy",
    "set_vision_trainable",
    "model_state_for_save",
    "save_step_checkpoint",
    "save_training_checkpoint",
    "check_finite",
    "mean_over_ranks",
    "link_final",
    "merged_for_save",
    "checkpoint_dtype",
    "fingerprint",
    "restore_step_checkpoint",
    "vision_param_groups",
]


def is_lora_model(model: nn.Module) -> bool:
    """Whether the model carries LoRA/DoRA adapters."""
    return bool(get_adapter_params(model))


def set_trainable(model: nn.Module, *, projector_trainable: bool) -> Set[str]:
    """Freeze all but what trains; returns the names of trainable parameters.

    LoRA models train their adapters (+ the projector if asked); full models train the LLM
    (+ the projector if asked). The vision tower never trains here.
    """
    if is_lora_model(model):
        names = set(get_adapter_params(model))
    else:
        names = {n for n, _ in model.named_parameters() if n.startswith(("decoder.", "tok_embeddings."))}
    if projector_trainable:
        names |= set(get_fusion_params(model))
    set_trainable_params(model, names)
    return names


def built_projector_trainable(model: nn.Module) -> bool:
    """Whether ``model`` was built with a trainable projector (``model.projector_trainable`` in
    a config). Read from its parameters before :func:`set_trainable`, so that the config says
    it in one place and the recipe follows what was built."""
    return any(p.requires_grad for p in get_fusion_params(model).values())


def lora_rank_alpha(model: nn.Module) -> Tuple[int, float]:
    """``(rank, alpha)`` of the LoRA / DoRA adapters of ``model``, as built (the merge scale is
    ``alpha / rank``). Raises ValueError when the model has no adapter, or adapters of
    different scales (one merge scale would be wrong for some of them)."""
    found = set()
    for module in model.modules():
        if hasattr(module, "lora_a") and hasattr(module, "lora_b"):
            rank = module.lora_a.out_features
            scale = module.scaling if hasattr(module, "scaling") else module.alpha / module.rank
            found.add((rank, float(scale * rank)))
    if len(found) != 1:
        raise ValueError(f"expected LoRA adapters of one rank and alpha, found {sorted(found) or 'none'}")
    return found.pop()


def trainable_state_keys(trainable: Set[str]) -> Set[str]:
    """The state-dict keys of the parameters named in ``trainable`` (``named_parameters`` names).

    torchtune's ``EarlyFusionModel`` keeps the token embedding at its top level but saves it as
    ``decoder.tok_embeddings.weight`` (a state-dict hook), so that one name differs."""
    return {"decoder." + n if n.startswith("tok_embeddings.") else n for n in trainable}


def upcast_trainable(model: nn.Module, trainable: Set[str], dtype: torch.dtype = torch.float32) -> int:
    """Store the parameters named in ``trainable`` in ``dtype`` (their gradients and AdamW
    moments follow); the frozen rest keeps the compute dtype. Returns how many were cast.

    Pure-bf16 AdamW loses updates smaller than half a bf16 step of the weight: at POVID's lr
    1e-7 a LoRA-A entry of ~1e-2 never moves. The released run trains with fp32 master weights
    (DeepSpeed bf16); fp32 trainable parameters under :func:`mixed_precision` compute the same
    update. Call it after any frozen copy of the model (the full fine-tuning reference) is made.
    """
    cast = 0
    for name, param in model.named_parameters():
        if name in trainable and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += param.numel()
    return cast


def mixed_precision(
    device: torch.device, compute_dtype: torch.dtype, trainable_dtype: torch.dtype, *, distributed: bool
) -> Any:
    """The context a training forward runs in: ``torch.autocast`` to ``compute_dtype`` when the
    trainable parameters are kept in a wider ``trainable_dtype`` on one device (matmuls then see
    compute-dtype copies of them, as DeepSpeed's bf16 copies of its fp32 masters); a no-op when
    the dtypes agree, or under FSDP2, where :func:`shard_llava`'s ``MixedPrecisionPolicy`` does
    the cast at all-gather (autocast would keep a cast copy of every unsharded layer)."""
    if distributed or compute_dtype == trainable_dtype:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype)


def disable_dropout(model: nn.Module) -> int:
    """Turn every dropout of ``model`` off, LoRA's included (TRL's ``disable_dropout``, which
    POVID's released trainer inherits): a policy log-prob and its online argmax must not be
    random. Returns the number of dropout modules and attention-dropout settings switched off."""
    switched = 0
    for module in model.modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            module.p = 0.0
            switched += 1
        if isinstance(getattr(module, "attn_dropout", None), float) and module.attn_dropout > 0:
            module.attn_dropout = 0.0
            switched += 1
    return switched


def plan_run(
    n_batches: int, accumulation: int, epochs: int, max_steps_per_epoch: Optional[int], max_steps: Optional[int]
) -> Tuple[int, int, int]:
    """``(batches_per_epoch, steps_per_epoch, total_steps)`` of a training run.

    An epoch consumes every batch of the dataloader, or as many as ``max_steps_per_epoch``
    optimizer steps take (torchtune's key; None: no cap); the run lasts :func:`run_length`.
    """
    batches = n_batches
    if max_steps_per_epoch is not None:
        if max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1 or null, got {max_steps_per_epoch}")
        batches = min(n_batches, max_steps_per_epoch * accumulation)
    steps_per_epoch = -(-batches // accumulation)
    return batches, steps_per_epoch, run_length(steps_per_epoch, epochs, max_steps)


def cosine_schedule_with_warmup_ratio(
    optimizer: torch.optim.Optimizer, num_training_steps: int, warmup_ratio: float = 0.03, num_cycles: float = 0.5
) -> torch.optim.lr_scheduler.LambdaLR:
    """torchtune's cosine schedule with the warmup given as a share of the run, as POVID's
    released scripts (TRL's ``warmup_ratio``) give it: ``round(warmup_ratio * steps)`` steps.

    The training recipes call their ``lr_scheduler`` block with the optimizer and
    ``num_training_steps``; torchtune's own ``get_cosine_schedule_with_warmup`` (with
    ``num_warmup_steps``) fits the block as well.
    """
    from torchtune.training import get_cosine_schedule_with_warmup

    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"lr_scheduler.warmup_ratio must be in [0, 1], got {warmup_ratio}")
    return get_cosine_schedule_with_warmup(
        optimizer,
        num_warmup_steps=int(round(warmup_ratio * num_training_steps)),
        num_training_steps=num_training_steps,
        num_cycles=num_cycles,
    )


def setup_profiler(profiler_cfg: Any) -> Any:
    """The profiler of a training recipe's ``profiler`` block (torchtune's
    ``setup_torch_profiler`` or a component of one's own); a no-op one without the block.

    The recipe calls ``start()`` before its loop, ``step()`` after every optimizer step and
    ``stop()`` at the end, as torchtune's recipes do.
    """
    from torchtune import config
    from torchtune.training import DummyProfiler

    if profiler_cfg is None:
        return DummyProfiler()
    built = config.instantiate(profiler_cfg)
    # torchtune's setup_torch_profiler returns (profiler, its resolved config).
    return built[0] if isinstance(built, tuple) else built


def run_length(steps_per_epoch: int, epochs: int, max_steps: Optional[int]) -> int:
    """Optimizer steps of a run, as Hugging Face's Trainer counts them: ``max_steps`` when set
    (epochs cycle as often as it takes), otherwise ``epochs`` passes over the data."""
    if max_steps is not None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {max_steps}")
        return int(max_steps)
    return steps_per_epoch * epochs


def image_encoder(model: nn.Module) -> nn.Module:
    """The LLaVA vision encoder (CLIP tower + projector) of a fusion model."""
    return model.encoders["image"]


def encode_images(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Projected image features ``[n, tokens, dim]``: the tower runs without grad (it is
    frozen), the projector with grad if it trains."""
    encoder = image_encoder(model)
    with torch.no_grad():
        clip = encoder.image_features(images)
    # A trainable projector may be kept in fp32 (upcast_trainable) while the tower computes in
    # bf16; FSDP2 leaves the replicated encoder to us, so the cast is done here.
    projector_dtype = next(encoder.projector.parameters()).dtype
    return encoder.projector(clip.to(projector_dtype)).to(clip.dtype)


Positions = Tuple[torch.Tensor, torch.Tensor]
"""``(rows, cols)``: index tensors of the sequence positions whose logits are wanted."""


def answer_positions(labels: torch.Tensor) -> Positions:
    """Positions ``t`` whose logits are scored: those whose next label ``t + 1`` is not ignored
    (logits at ``t`` predict token ``t + 1``), in row-major order."""
    rows, cols = (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols


def answer_targets(labels: torch.Tensor, positions: Positions) -> torch.Tensor:
    """The token each position of :func:`answer_positions` predicts: ``labels[row, t + 1]``."""
    rows, cols = positions
    return labels[rows, cols + 1]


class _GatheredOutput:
    """Stands in for an output head that is not an ``nn.Module`` (torchtune's ``TiedLinear``,
    a plain callable over the embedding weight), applying it to the selected positions only."""

    def __init__(self, head: Any, positions: Positions) -> None:
        self.head, self.positions = head, positions

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        return self.head(h[self.positions])


@contextmanager
def output_at(model: nn.Module, positions: Optional[Positions]) -> Iterator[None]:
    """Inside the block, ``model(tokens, ...)`` returns logits ``[n, vocab]`` at ``positions``
    only instead of ``[rows, L, vocab]`` (``None``: every position, unchanged).

    The output projection is the largest single matmul of a LLaVA step on short rows (vocab
    32064), and only answer positions are ever scored. The selection is applied inside the
    model's forward (a pre-hook on ``decoder.output`` gathers the normed hidden states), not
    after it returns: under FSDP2 the root module's parameters, the output head among them, are
    resharded once the forward is over.
    """
    if positions is None:
        yield
        return
    decoder = model.decoder
    if getattr(decoder, "num_output_chunks", 0):
        raise ValueError("output_at does not support chunked output heads (num_output_chunks > 0)")
    head = decoder.output
    if isinstance(head, nn.Module):
        handle = head.register_forward_pre_hook(lambda _module, args: (args[0][positions], *args[1:]))
        try:
            yield
        finally:
            handle.remove()
    else:
        decoder.output = _GatheredOutput(head, positions)
        try:
            yield
        finally:
            decoder.output = head


def row_logits(
    model: nn.Module,
    tokens: torch.Tensor,
    features: torch.Tensor,
    row_image: Optional[torch.Tensor] = None,
    positions: Optional[Positions] = None,
) -> torch.Tensor:
    """Logits of answer rows that share per-image ``features`` (``row_image[i]``: the image of
    row ``i``; ``None``: one image per row): ``[rows, L, vocab]``, or ``[n, vocab]`` at
    ``positions`` only (see :func:`output_at`)."""
    image = {"features": features}
    if row_image is not None:
        image["row_index"] = row_image
    with output_at(model, positions):
        return model(tokens, encoder_input={"image": image})


def answer_token_counts(labels: torch.Tensor) -> torch.Tensor:
    """Scored (unmasked) tokens per row."""
    return (labels[:, 1:] != IGNORE_INDEX).sum(-1)


def shard_llava(
    model: nn.Module, *, reshard_after_forward: bool = True, compute_dtype: Optional[torch.dtype] = None
) -> None:
    """FSDP2: shard every LLM layer and the rest of the decoder; keep the vision encoder
    replicated (frozen tower; a trainable projector is kept in sync by
    :func:`all_reduce_replicated_grads`) so that it can run outside the model's forward.

    ``compute_dtype``: parameters are all-gathered in it and gradients reduced in fp32
    (``MixedPrecisionPolicy``), so sharded fp32 trainable parameters (:func:`upcast_trainable`)
    compute like the frozen bf16 base and take fp32 updates."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32) if compute_dtype else None
    kwargs = {"reshard_after_forward": reshard_after_forward, **({"mp_policy": policy} if policy else {})}
    encoder_params = set(image_encoder(model).parameters())
    for layer in model.decoder.layers:
        fully_shard(layer, **kwargs)
    fully_shard(model, ignored_params=encoder_params, **kwargs)


def all_reduce_replicated_grads(params: Iterable[nn.Parameter]) -> None:
    """Average the gradients of parameters FSDP does not manage (the projector)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    for param in params:
        if param.grad is not None:
            dist.all_reduce(param.grad, op=dist.ReduceOp.AVG)


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: Optional[float]) -> torch.Tensor:
    """Clip the global gradient norm of FSDP-sharded (DTensor) and replicated gradients alike.

    ``torch.nn.utils.clip_grad_norm_`` refuses a mix of the two, which is what
    :func:`shard_llava` leaves when the projector trains. Returns the norm before clipping.
    ``max_norm`` ``None`` (or 0) measures the norm without clipping, as DeepSpeed's default
    ``gradient_clipping: 0`` of POVID's released run.
    """
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    squares = []
    for grad in grads:
        norm = torch.linalg.vector_norm(grad.float())
        squares.append((norm.full_tensor() if isinstance(norm, DTensor) else norm) ** 2)
    total = torch.stack(squares).sum().sqrt()
    if not max_norm:
        return total
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        grad.mul_(scale.to(grad.dtype))
    return total


def peak_memory_gb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak, or peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def timed_batches(loader: Iterable[Any]) -> Iterator[Tuple[float, Any]]:
    """``(seconds waited, batch)`` for each batch of ``loader``: the time the training loop spends
    waiting for data (reading, decoding and transforming images, collating), which more data
    loader workers would hide."""
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        try:
            batch = next(batches)
        except StopIteration:
            return
        yield time.perf_counter() - start, batch


class MetricsJsonl:
    """Append one JSON object per step to ``metrics.jsonl`` (flushed, so a crash keeps them).

    ``resume_step`` > 0 keeps the rows up to that step and drops later ones, which a run that
    stopped between two checkpoints logged but will now redo.
    """

    def __init__(self, path: str | Path, resume_step: int = 0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if resume_step > 0 and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line + "\n")
                except (json.JSONDecodeError, KeyError):
                    continue  # a line cut short by the crash
        self.path.write_text("".join(kept), encoding="utf-8")
        self._file = self.path.open("a", encoding="utf-8")

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        """Write ``{"step": step, **metrics}`` (tensors become floats)."""
        row = {"step": step}
        row.update({k: float(v) for k, v in metrics.items()})
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def latest_checkpoint(output_dir: str | Path) -> Optional[Path]:
    """The newest ``step_N`` directory holding a complete ``recipe_state.pt``."""
    candidates: List[Path] = []
    for path in Path(output_dir).glob("step_*"):
        if (path / "recipe_state.pt").exists() and path.name[5:].isdigit():
            candidates.append(path)
    return max(candidates, key=lambda p: int(p.name[5:])) if candidates else None


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- SFT and checkpoints


def answer_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, per_answer: bool = False) -> torch.Tensor:
    """Next-token cross-entropy of the labelled (answer) tokens.

    ``logits``: ``[n, vocab]`` at :func:`answer_positions` (the answer-only head of
    :func:`output_at`), or the full ``[rows, L, vocab]`` (``logits[:, t]`` predicts
    ``labels[:, t + 1]``; the same numbers up to float summation order).

    ``per_answer=False``: the mean over labelled tokens. ``per_answer=True``: the mean over
    answers of each answer's token mean, an answer being a run of labelled tokens (an assistant
    turn and its ``</s>``). Every answer then weighs the same: with the token mean a ``Yes`` next
    to a 60-token description is a few per cent of the loss, too little to learn to answer from
    the image.
    """
    positions = answer_positions(labels)
    if logits.dim() == 3:
        logits = logits[positions]
    ce = torch.nn.functional.cross_entropy(logits.float(), answer_targets(labels, positions), reduction="none")
    if not per_answer:
        return ce.mean()
    labelled = labels[:, 1:] != IGNORE_INDEX
    previous = torch.cat([torch.zeros_like(labelled[:, :1]), labelled[:, :-1]], dim=1)
    starts = (labelled & ~previous).flatten()
    # Answer index (0..n-1) of every scored position, in answer_positions' row-major order.
    answer = (torch.cumsum(starts.long(), 0) - 1)[labelled.flatten()]
    n = int(starts.sum())
    if n == 0:
        return ce.sum() * 0.0
    sums = ce.new_zeros(n).index_add_(0, answer, ce)
    counts = ce.new_zeros(n).index_add_(0, answer, torch.ones_like(ce))
    return (sums / counts).mean()


def set_vision_trainable(model: nn.Module, trainable: Set[str]) -> Set[str]:
    """Also train the CLIP layers that run (``encoders.image.clip.*``), on top of ``trainable``
    (what :func:`set_trainable` returned). Useful for a model whose tower is not pretrained (the
    synthetic world's); LLaVA-1.5 keeps CLIP frozen. Returns the new set of trainable names."""
    names = set(trainable) | {n for n, _ in model.named_parameters() if n.startswith("encoders.image.clip.")}
    set_trainable_params(model, names)
    return names


def model_state_for_save(
    model: nn.Module, *, distributed: bool, is_rank_zero: bool
) -> Dict[str, torch.Tensor]:
    """The full state dict on CPU (gathered under FSDP2; a copy on one device, so merging LoRA
    into it never touches the live weights)."""
    if distributed:
        from torchtune import training as tune_training

        return tune_training.gather_cpu_state_dict(model, is_rank_zero)
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def link_final(output_dir: str | Path, step_dir: Path) -> None:
    """Point ``output_dir/final`` at ``step_dir`` (a stable name for what comes next)."""
    link = Path(output_dir) / "final"
    link.unlink(missing_ok=True)
    link.symlink_to(step_dir.name)


_ADAPTER_SUFFIXES = (".lora_a.weight", ".lora_b.weight", ".magnitude")


def checkpoint_dtype(state: Dict[str, torch.Tensor]) -> torch.dtype:
    """The dtype most of a checkpoint's floating-point weights are stored in (by element count)."""
    counts: Dict[torch.dtype, int] = {}
    for tensor in state.values():
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def merged_for_save(
    state: Dict[str, torch.Tensor],
    base: Dict[str, torch.Tensor],
    trainable: Set[str],
    *,
    lora_rank: Optional[int],
    lora_alpha: Optional[float],
    save_dtype: torch.dtype,
) -> Dict[str, torch.Tensor]:
    """The model to save, with LoRA merged in fp32 against the checkpoint's own weights.

    ``state``: the trained model's full state on CPU (consumed: entries are popped to bound
    memory); ``base``: the checkpoint as loaded from disk (consumed too). A frozen weight is
    taken from ``base`` (not from the model's copy rounded to the compute dtype at load), a
    LoRA/DoRA-wrapped weight is ``base + (alpha / r) B A`` (torchtune's merge, one module at a
    time in fp32), a trained weight (a projector, full fine-tuning) is the model's own
    (fp32 master) value; everything is then cast to ``save_dtype``. Merging in bf16 instead
    rounds base + delta to a bf16 step and drops deltas below half of one: most of what a
    lr-1e-7 stage 1 learns.
    """
    from torchtune.modules.peft import get_merged_lora_ckpt

    wrapped = {k[: -len(".lora_a.weight")] for k in state if k.endswith(".lora_a.weight")}
    out: Dict[str, torch.Tensor] = {}
    for key in [k for k in state if not k.endswith(_ADAPTER_SUFFIXES)]:
        value, original = state.pop(key), base.pop(key, None)
        module = key[: -len(".weight")] if key.endswith(".weight") else None
        if key in trainable or original is None:
            tensor = value
        elif module in wrapped:
            one = {key: original.float()}
            for suffix in _ADAPTER_SUFFIXES:
                if module + suffix in state:
                    one[module + suffix] = state[module + suffix].float()
            tensor = get_merged_lora_ckpt(one, rank=lora_rank, alpha=lora_alpha)[key]
        else:
            tensor = original
        out[key] = tensor.to(save_dtype) if tensor.is_floating_point() else tensor
    return out


def save_step_checkpoint(
    checkpointer: Any,
    step_dir: Path,
    state: Dict[str, torch.Tensor],
    trainable: Set[str],
    recipe_state: Dict[str, Any],
    *,
    lora: bool,
    save_model: bool,
    save_dtype: Optional[torch.dtype] = None,
    lora_rank: Optional[int] = None,
    lora_alpha: Optional[float] = None,
    adapter_config: Optional[Dict[str, Any]] = None,
) -> None:
    """Write ``step_dir``: ``adapter/`` (LoRA), ``model/`` (merged llava-hf weights, when
    ``save_model`` or not LoRA) and ``recipe_state.pt`` last, so a directory with a recipe state
    is complete (:func:`latest_checkpoint`). ``state`` is the full state dict on CPU;
    ``trainable`` names what trains; their (fp32 master) values are kept in the recipe state
    for an exact resume. ``checkpointer`` is the run's :class:`povid.checkpoint.LlavaCheckpointer`
    (its output dir is ``step_dir``'s parent); the model is merged against the weights it loads
    (:func:`merged_for_save`) and saved in ``save_dtype`` (``None``: the checkpoint's own).
    ``lora_rank`` and ``lora_alpha`` scale the merge of a LoRA model (:func:`lora_rank_alpha`);
    a model without adapters needs neither."""
    trainable = trainable_state_keys(trainable)
    trained = {k: v for k, v in state.items() if k in trainable}
    if lora:
        checkpointer.save_adapter(trained, step_dir / "adapter", adapter_config or {})
    if save_model or not lora:
        base = checkpointer.load_checkpoint()["model"]
        dtype = save_dtype or checkpoint_dtype(base)
        merged = merged_for_save(
            dict(state), base, trainable, lora_rank=lora_rank, lora_alpha=lora_alpha, save_dtype=dtype
        )
        checkpointer.save_checkpoint(merged, name=f"{step_dir.name}/model")
    atomic_torch_save({**recipe_state, "trainable": trained}, step_dir / "recipe_state.pt")


def fingerprint(path: str | Path) -> str:
    """SHA-256 of a file's bytes, or of a directory's files (relative names and bytes, in
    sorted order: a ``datasets`` directory saved with ``save_to_disk``)."""
    path = Path(path)
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise FileNotFoundError(f"{path}: no such file, or a directory without files")
    for file in files:
        if file != path:
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with file.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def check_finite(value: torch.Tensor, what: str, *, step: int, epoch: int, last_checkpoint: Optional[Path]) -> None:
    """Stop a run before an update with a non-finite ``value`` (loss, gradient norm), naming the
    step about to be taken and the last good checkpoint.

    Raises:
        FloatingPointError: ``value`` holds a NaN or an infinity.
    """
    if not torch.isfinite(value).all():
        where = last_checkpoint or "none saved yet"
        raise FloatingPointError(
            f"non-finite {what} at step {step} (epoch {epoch}); training stopped before the update. "
            f"Last good checkpoint: {where}. Lower the learning rate or use fp32/bf16 instead of fp16."
        )


def mean_over_ranks(metrics: Dict[str, float], world_size: int) -> Dict[str, float]:
    """Average each metric over the ranks that report it (ranks may report different keys, e.g.
    a noise term only where a batch had noise rows). Every rank must call it."""
    parts: List[Optional[Dict[str, float]]] = [None] * world_size
    dist.all_gather_object(parts, metrics)
    keys = dict.fromkeys(k for part in parts if part for k in part)
    return {k: sum(p[k] for p in parts if p and k in p) / sum(bool(p) and k in p for p in parts) for k in keys}


def save_training_checkpoint(
    step_dir: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    checkpointer: Any,
    trainable: Set[str],
    progress: Dict[str, Any],
    lora: bool,
    save_model: bool,
    final: bool,
    save_dtype: Optional[torch.dtype],
    distributed: bool,
    is_rank_zero: bool,
    adapter_config: Optional[Dict[str, Any]] = None,
) -> None:
    """A recipe's whole checkpoint at ``step_dir`` (``output_dir/step_N``), on any world size:
    gathers the model and optimizer state (every rank takes part under FSDP2), writes them with
    :func:`save_step_checkpoint` on rank 0 with ``progress`` (step, epoch, scheduler, ... as the
    recipe resumes from them), points ``final`` at it when ``final``, and waits for all ranks."""
    state = model_state_for_save(model, distributed=distributed, is_rank_zero=is_rank_zero)
    if distributed:
        from torchtune import training as tune_training

        optimizer_state = tune_training.get_full_optimizer_state_dict(model, optimizer, is_rank_zero)
    else:
        optimizer_state = optimizer.state_dict()
    if is_rank_zero:
        # The merge scale comes from the adapters that were built, not from a second copy of
        # the config's rank and alpha.
        rank, alpha = lora_rank_alpha(model) if lora else (None, None)
        save_step_checkpoint(
            checkpointer, step_dir, state, trainable, {**progress, "optimizer": optimizer_state},
            lora=lora, save_model=save_model or final, save_dtype=save_dtype, lora_rank=rank,
            lora_alpha=alpha, adapter_config=adapter_config,
        )  # fmt: skip
        if final:
            link_final(step_dir.parent, step_dir)
    if distributed:
        dist.barrier()


def restore_step_checkpoint(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step_dir: Path,
    *,
    lora: bool,
    distributed: bool,
    device: torch.device,
) -> Dict[str, Any]:
    """Load what :func:`save_step_checkpoint` wrote into ``model`` and ``optimizer``; returns the
    recipe state (step, epoch, scheduler, ... as the recipe stored them)."""
    from povid.checkpoint import LlavaCheckpointer, load_model_state

    state = torch.load(step_dir / "recipe_state.pt", weights_only=False)
    if lora:
        model.load_state_dict(state["trainable"], strict=False)
    else:
        weights = LlavaCheckpointer(step_dir / "model").load_checkpoint()["model"]
        # The saved model is in the save dtype; what trains resumes from its fp32 masters.
        weights.update(state.get("trainable") or {})
        if distributed:
            from torchtune import training as tune_training

            tune_training.load_from_full_model_state_dict(model, weights, device, strict=True)
        else:
            load_model_state(model, weights, step_dir / "model")
    if distributed:
        from torchtune import training as tune_training

        tune_training.load_from_full_optimizer_state_dict(model, optimizer, state["optimizer"], device)
    else:
        optimizer.load_state_dict(state["optimizer"])
    return state


def vision_param_groups(model: nn.Module, lr: float, vision_lr_scale: float = 1.0) -> List[Dict[str, Any]]:
    """Optimizer parameter groups: the trainable CLIP-tower parameters at ``lr *
    vision_lr_scale`` (LLaVA-OneVision-style training of the tower at a lower rate), the other
    trainable parameters at ``lr``. Empty groups are left out."""
    tower, rest = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (tower if name.startswith("encoders.image.clip.") else rest).append(param)
    groups = [{"params": rest}] if rest else []
    if tower:
        groups.append({"params": tower, "lr": lr * vision_lr_scale})
    return groups


class StepCheckpoints:
    """The ``step_N/`` checkpoints of one training run, as both training recipes keep them:
    :meth:`save` writes one per step (a second call for the same step only adds the merged
    model, or links ``final``), :meth:`resume` restores the newest. ``last`` is the newest
    checkpoint written or restored (the NaN guard names it)."""

    def __init__(
        self,
        output_dir: str | Path,
        *,
        checkpointer: Any,
        trainable: Set[str],
        lora: bool,
        save_merged: bool,
        save_dtype: Optional[torch.dtype],
        adapter_config: Optional[Dict[str, Any]],
        seed: int,
        world_size: int,
        distributed: bool,
        is_rank_zero: bool,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.checkpointer = checkpointer
        self.trainable = trainable
        self.lora = lora
        self.save_merged = save_merged
        self.save_dtype = save_dtype
        self.adapter_config = adapter_config or {}
        self.seed = seed
        self.world_size = world_size
        self.distributed = distributed
        self.is_rank_zero = is_rank_zero
        self.last: Optional[Path] = None

    @classmethod
    def from_config(
        cls, cfg: Any, *, checkpointer: Any, trainable: Set[str], lora: bool, device: torch.device
    ) -> "StepCheckpoints":
        """The checkpoints of a training config (``output_dir``, ``save_merged``, ``save_dtype``,
        ``adapter_config``, ``seed``) on this process's world."""
        from omegaconf import OmegaConf
        from torchtune import training, utils

        world_size, rank = utils.get_world_size_and_rank()
        return cls(
            cfg.output_dir, checkpointer=checkpointer, trainable=trainable, lora=lora,
            save_merged=bool(cfg.save_merged), seed=cfg.seed, world_size=world_size,
            save_dtype=training.get_dtype(cfg.save_dtype, device=device) if cfg.get("save_dtype") else None,
            adapter_config=OmegaConf.to_container(cfg.adapter_config) if cfg.get("adapter_config") else {},
            distributed=training.is_distributed(), is_rank_zero=rank == 0,
        )  # fmt: skip

    def save(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        lr_scheduler: Any,
        *,
        global_step: int,
        epoch: int,
        batches_done_in_epoch: int,
        final: bool = False,
    ) -> None:
        """Write ``step_<global_step>/``: adapters (LoRA), merged llava-hf model (``save_merged``
        or ``final``), optimizer and loop state."""
        step_dir = self.output_dir / f"step_{global_step}"
        if self.last == step_dir and (not final or (step_dir / "model").exists()):
            if final and self.is_rank_zero:
                link_final(self.output_dir, step_dir)
            return
        save_training_checkpoint(
            step_dir,
            model=model,
            optimizer=optimizer,
            checkpointer=self.checkpointer,
            trainable=self.trainable,
            progress={
                "global_step": global_step,
                "epoch": epoch,
                "batches_done_in_epoch": batches_done_in_epoch,
                "lr_scheduler": lr_scheduler.state_dict(),
                "seed": self.seed,
                "world_size": self.world_size,
            },
            lora=self.lora,
            save_model=self.save_merged,
            final=final,
            save_dtype=self.save_dtype,
            distributed=self.distributed,
            is_rank_zero=self.is_rank_zero,
            adapter_config=self.adapter_config,
        )
        if self.is_rank_zero:
            _log.info(f"Saved checkpoint {step_dir}")
        self.last = step_dir

    def resume(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, lr_scheduler: Any, *, device: torch.device
    ) -> Optional[Tuple[int, int, int]]:
        """Restore the newest checkpoint into model, optimizer and scheduler; returns
        ``(global_step, epoch, batches_done_in_epoch)``, or None when there is none yet."""
        step_dir = latest_checkpoint(self.output_dir)
        if step_dir is None:
            _log.info(f"resume_from_checkpoint: no checkpoint in {self.output_dir}, starting fresh")
            return None
        state = restore_step_checkpoint(
            model, optimizer, step_dir, lora=self.lora, distributed=self.distributed, device=device
        )
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        self.last = step_dir
        _log.info(f"Resumed from {step_dir} at step {state['global_step']}")
        return state["global_step"], state["epoch"], state["batches_done_in_epoch"]


class TrainingLog:
    """A training run's metrics: every step to ``metrics.jsonl``, every ``log_every_n_steps``
    to the config's metric logger; averaged over ranks, written by rank 0."""

    def __init__(
        self, metric_logger: Any, metrics_file: Optional[MetricsJsonl], *, log_every_n_steps: int,
        world_size: int, distributed: bool, is_rank_zero: bool,
    ) -> None:  # fmt: skip
        self.metric_logger = metric_logger
        self.metrics_file = metrics_file
        self.log_every_n_steps = log_every_n_steps
        self.world_size = world_size
        self.distributed = distributed
        self.is_rank_zero = is_rank_zero

    @classmethod
    def from_config(cls, cfg: Any, *, resume_step: int) -> "TrainingLog":
        """The config's ``metric_logger`` (given the config to record) and
        ``${output_dir}/metrics.jsonl``, kept up to ``resume_step``; on rank 0 only."""
        from torchtune import config, training, utils

        world_size, rank = utils.get_world_size_and_rank()
        metric_logger, metrics_file = None, None
        if rank == 0:
            metric_logger = config.instantiate(cfg.metric_logger)
            metric_logger.log_config(cfg)
            metrics_file = MetricsJsonl(Path(cfg.output_dir) / "metrics.jsonl", resume_step)
        return cls(
            metric_logger, metrics_file, log_every_n_steps=cfg.log_every_n_steps, world_size=world_size,
            distributed=training.is_distributed(), is_rank_zero=rank == 0,
        )  # fmt: skip

    def log(self, step: int, metrics: Dict[str, float]) -> None:
        """Record one optimizer step's metrics (every rank calls it)."""
        if self.distributed:
            metrics = mean_over_ranks(metrics, self.world_size)
        if self.is_rank_zero:
            self.metrics_file.log(step, metrics)
            if step % self.log_every_n_steps == 0:
                self.metric_logger.log_dict(metrics, step=step)

    def close(self) -> None:
        """Close the logger and the metrics file (rank 0)."""
        if self.is_rank_zero:
            self.metric_logger.close()
            self.metrics_file.close()
