"""Tiny random LLaVA-1.5 checkpoints written with transformers, in every layout the toolkit loads.

A helper module for tests (not a test file). It builds a tiny ``LlavaForConditionalGeneration``
with random, deliberately non-trivial weights and writes it in one of the checkpoint layouts
of DESIGN.md section 2, so a checkpointer can be tested for exact logit parity against
transformers.

Layouts (``save_llava_layout(..., layout=...)``)::

    A   transformers 4.52-4.57 in-memory names (what ``model.state_dict()`` gave there):
        model.vision_tower.vision_model.*        model.multi_modal_projector.linear_{1,2}.*
        model.language_model.{embed_tokens,layers,norm}.*                   lm_head.weight
    A'  (or A with ``vision_model_prefix=False``) transformers 5.x in-memory names: A without
        ``vision_model.``: model.vision_tower.{embeddings,pre_layrnorm,encoder,post_layernorm}.*
    B   published llava-hf files (llava-hf/llava-1.5-7b-hf):
        vision_tower.vision_model.*   multi_modal_projector.linear_{1,2}.*
        language_model.model.*        language_model.lm_head.weight
    C   what transformers 5.x ``save_pretrained`` writes: B without ``vision_model.``
        (checked on transformers 5.23: vision_tower.embeddings.*, vision_tower.encoder.*, ...)
    D   original LLaVA (liuhaotian/llava-v1.5-7b, POVID): LLM directory with
        model.embed_tokens / model.layers.* / model.norm / lm_head.weight /
        model.mm_projector.{0,2}.{weight,bias}, text vocabulary only (no image token: the
        original splices the image at id -200), an original-LLaVA ``config.json`` and NO vision
        tower; the CLIP tower is written to a separate ``clip_dir`` (``vision_model.*`` keys,
        as ``CLIPVisionModel`` saved it before transformers 5, or a whole ``CLIPModel`` like
        openai/clip-vit-large-patch14-336 ships).

Vocabulary convention of the tiny model (the tiny twin of llava-hf's 32000 + ``<image>`` 32000 +
``<pad>`` 32001, padded to 32064): SentencePiece vocabulary of ``TEXT_VOCAB`` = 320 pieces,
``image_token_index`` = 320, ``pad_token_id`` = 321, embedding rows padded to 384. Layout D keeps
the first ``image_token_index`` rows of ``embed_tokens`` and ``lm_head``, so the logits of a model
loaded from D equal ``hf_logits(...)[..., :image_token_index]``.

Some tensors can never influence the logits, so a wrong mapping of them shows only when
tensors are compared key by key (``layout_state_dict`` / ``read_checkpoint_dir``): the last CLIP
encoder layer and ``post_layernorm`` (``vision_feature_layer=-2`` skips them, as in the real
LLaVA-1.5) and every ``self_attn.k_proj.bias`` of CLIP (softmax is invariant to the constant a
key bias adds to each query's scores).

Facts checked on transformers 5.23 (the installed version):
  - in memory, ``LlavaForConditionalGeneration`` has ``model.vision_tower.embeddings...`` (no
    ``vision_model.``: 5.x's ``CLIPVisionModel`` has no inner ``vision_model`` and its loader
    strips that prefix), i.e. layout A';
  - ``save_pretrained`` reverts llava's renames but not CLIP's prefix, i.e. writes layout C
    (``save_pretrained(save_original_format=False)`` writes A'); it only writes safetensors;
  - ``from_pretrained`` loads A, A', B and C (safetensors or .bin, sharded or not, with or
    without ``position_ids``) with no missing or unexpected keys and bitwise-equal logits;
  - ``CLIPVisionModel.save_pretrained`` writes keys without ``vision_model.`` too.

Nothing here downloads anything.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Mapping

import torch

# transformers is a dev-only dependency (pyproject: [project.optional-dependencies] dev).
import transformers
from transformers import (
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
)

__all__ = [
    "TEXT_VOCAB",
    "IMAGE_TOKEN_INDEX",
    "PAD_TOKEN_INDEX",
    "PADDED_VOCAB",
    "ORIGINAL_IMAGE_TOKEN_INDEX",
    "LAYOUTS",
    "CLIP_MEAN",
    "CLIP_STD",
    "tiny_llava_config",
    "make_tiny_hf_llava",
    "num_image_tokens",
    "make_inputs",
    "collapse_image_tokens",
    "hf_logits",
    "layout_state_dict",
    "save_llava_layout",
    "read_checkpoint_dir",
    "original_llava_config",
    "write_tiny_tokenizer",
    "tiny_corpus",
]

# ---------------------------------------------------------------------------------------------
# Tiny model
# ---------------------------------------------------------------------------------------------

TEXT_VOCAB = 320  # SentencePiece pieces: 3 specials + 256 bytes + 61 merges (Llama: 32000)
IMAGE_TOKEN_INDEX = TEXT_VOCAB  # llava-hf: 32000 = first id after the SentencePiece vocab
PAD_TOKEN_INDEX = TEXT_VOCAB + 1  # llava-hf: 32001
PADDED_VOCAB = 384  # embedding rows, a multiple of 64 (llava-hf: 32064)
ORIGINAL_IMAGE_TOKEN_INDEX = -200  # original LLaVA's IMAGE_TOKEN_INDEX

LAYOUTS = ("A", "A'", "B", "C", "D")

# CLIP preprocessing constants (openai/clip-vit-large-patch14-336 preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def tiny_llava_config(
    vocab_size: int = PADDED_VOCAB,
    image_token_index: int = IMAGE_TOKEN_INDEX,
    pad_token_id: int | None = PAD_TOKEN_INDEX,
    image_size: int = 42,
    patch_size: int = 14,
    vision_hidden_size: int = 32,
    vision_intermediate_size: int = 64,
    vision_layers: int = 3,
    vision_heads: int = 2,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    max_position_embeddings: int = 256,
    rms_norm_eps: float = 1e-5,
    rope_theta: float = 10000.0,
    initializer_range: float = 0.2,
    attn_implementation: str | None = None,
) -> LlavaConfig:
    """A LLaVA-1.5-shaped config, tiny (0.18 M parameters with the defaults).

    Same structure as llava-hf/llava-1.5-7b-hf: CLIP vision tower with QuickGELU,
    ``vision_feature_layer=-2``, ``vision_feature_select_strategy="default"`` (CLS dropped),
    projector Linear -> GELU (erf) -> Linear with bias, Llama decoder, untied ``lm_head``.
    Defaults: image 42 px / patch 14 -> 9 image tokens per image; vocab as described in the
    module docstring (text 320, image 320, pad 321, 384 rows). ``initializer_range`` is only
    recorded in the config: :func:`make_tiny_hf_llava` draws all weights itself.
    """
    if not 0 <= image_token_index < vocab_size:
        raise ValueError(f"image_token_index {image_token_index} outside vocab {vocab_size}")
    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
    vision_config = CLIPVisionConfig(
        hidden_size=vision_hidden_size,
        intermediate_size=vision_intermediate_size,
        num_hidden_layers=vision_layers,
        num_attention_heads=vision_heads,
        image_size=image_size,
        patch_size=patch_size,
        num_channels=3,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        projection_dim=vision_hidden_size,
        initializer_range=initializer_range,
    )
    text_config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        hidden_act="silu",
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        rope_theta=rope_theta,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=image_token_index,
        image_seq_length=(image_size // patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    if attn_implementation is not None:
        config._attn_implementation = attn_implementation
    return config


def _randomize_(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter with seeded random values that make each tensor matter.

    Matrices ~ N(0, 1/fan_in) (activations keep unit scale, softmaxes stay non-degenerate),
    biases ~ N(0, 0.1^2), norm weights ~ 1 + N(0, 0.2^2) (so a norm mapped to the wrong place
    or left at its default changes the logits), embedding tables ~ N(0, 0.5^2).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = param.shape
            noise = torch.randn(shape, generator=gen, dtype=torch.float32)
            leaf = name.rsplit(".", 1)[-1]
            if param.ndim == 1 and leaf == "weight":  # LayerNorm / RMSNorm gains
                value = 1.0 + 0.2 * noise
            elif param.ndim == 1:  # biases, class_embedding
                value = (0.5 if "class_embedding" in name else 0.1) * noise
            elif "embed_tokens" in name or "position_embedding" in name:
                value = 0.5 * noise
            else:  # Linear / Conv2d weights
                fan_in = shape[1:].numel()
                value = noise / math.sqrt(fan_in)
            param.copy_(value.to(param.dtype))


def make_tiny_hf_llava(seed: int = 0, **config_overrides) -> LlavaForConditionalGeneration:
    """A tiny ``LlavaForConditionalGeneration`` in fp32 eval mode with seeded random weights.

    ``config_overrides`` go to :func:`tiny_llava_config`. Every parameter (including layer and
    RMS norm gains and biases, ``class_embedding``, ``lm_head`` independent of
    ``embed_tokens``) is drawn from a generator seeded with ``seed``; the global RNG is left
    untouched. Same seed and overrides -> bitwise identical weights.
    """
    config = tiny_llava_config(**config_overrides)
    with torch.random.fork_rng(devices=[]):
        model = LlavaForConditionalGeneration(config)
    model = model.to(torch.float32)
    _randomize_(model, seed)
    return model.eval()


def num_image_tokens(config: LlavaConfig) -> int:
    """Placeholders per image: (image_size / patch_size)^2 (CLS dropped, strategy "default")."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if config.vision_feature_select_strategy == "full":
        n += 1
    return n


def make_inputs(
    config: LlavaConfig,
    batch_size: int = 2,
    seq_len: int = 24,
    images_per_row: int = 1,
    seed: int = 0,
    text_vocab_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``(input_ids [B, L], pixel_values [B * images_per_row, 3, H, W])``.

    Each row is ``<s>`` (1), random text ids, and ``images_per_row`` runs of
    ``num_image_tokens(config)`` image placeholders at different offsets per row. Text ids are
    drawn from ``[3, text_vocab_size)`` (default ``config.image_token_index``), so they are valid
    for the layout-D vocabulary too. ``pixel_values`` are already "normalized" (N(0, 1)).
    """
    gen = torch.Generator().manual_seed(seed)
    n_img = num_image_tokens(config)
    text_vocab = text_vocab_size or config.image_token_index
    n_text = seq_len - 1 - images_per_row * n_img  # text tokens besides <s>
    if n_text < 0:
        raise ValueError(f"seq_len {seq_len} too short for {images_per_row} image(s) x {n_img}")
    rows = []
    for _ in range(batch_size):
        text = torch.randint(3, text_vocab, (n_text,), generator=gen).tolist()
        cuts = sorted(torch.randint(0, n_text + 1, (images_per_row,), generator=gen).tolist())
        row, prev = [1], 0
        for cut in cuts:
            row += text[prev:cut] + [config.image_token_index] * n_img
            prev = cut
        rows.append(row + text[prev:])
    input_ids = torch.tensor(rows, dtype=torch.long)
    vc = config.vision_config
    pixel_values = torch.randn(
        batch_size * images_per_row, vc.num_channels, vc.image_size, vc.image_size, generator=gen
    )
    return input_ids, pixel_values


def collapse_image_tokens(
    input_ids: torch.Tensor,
    image_token_index: int,
    n_image_tokens: int,
    original_image_token: int = ORIGINAL_IMAGE_TOKEN_INDEX,
) -> list[torch.Tensor]:
    """llava-hf ids -> original-LLaVA ids: each run of ``n_image_tokens`` placeholders becomes
    one ``-200``. Returns one 1-D tensor per row (rows may differ in length)."""
    rows = []
    for row in input_ids.tolist():
        out, i = [], 0
        while i < len(row):
            if row[i] == image_token_index:
                run = row[i : i + n_image_tokens]
                if len(run) != n_image_tokens or any(t != image_token_index for t in run):
                    raise ValueError(f"image placeholder run at {i} is not {n_image_tokens} long")
                out.append(original_image_token)
                i += n_image_tokens
            else:
                out.append(row[i])
                i += 1
        rows.append(torch.tensor(out, dtype=input_ids.dtype))
    return rows


@torch.no_grad()
def hf_logits(
    model: LlavaForConditionalGeneration,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' forward in fp32 (no grad, eval mode, no KV cache): logits
    ``[B, L, vocab_size]``.

    How transformers expects the image in ``input_ids``: every image is represented by exactly
    ``num_image_tokens(config)`` copies of ``config.image_token_index`` ((image_size/patch)^2,
    576 for 336 px / patch 14, CLS dropped). Image features are scattered into those positions
    in row-major order over the whole batch (``masked_scatter``), images taken in the order of
    ``pixel_values``; the total placeholder count must equal ``n_images * num_image_tokens`` or
    transformers raises. Nothing else marks an image (no start/end tokens in LLaVA-1.5).

    For layout D the comparison model is still this llava-hf model with its
    ``image_token_index``: the original-LLaVA view of the same input is
    ``collapse_image_tokens(input_ids, ...)`` (one -200 per image, features spliced at the same
    positions, so position ids agree), and a model loaded from D must produce
    ``hf_logits(...)[..., :image_token_index]`` (D has no rows for the image / pad tokens).
    """
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("hf_logits compares in fp32: pass an fp32 model")
    model.eval()
    n_img = num_image_tokens(model.config)
    n_placeholders = int((input_ids == model.config.image_token_index).sum())
    n_images = 0 if pixel_values is None else pixel_values.shape[0]
    if n_placeholders != n_images * n_img:
        raise ValueError(
            f"{n_placeholders} image placeholders for {n_images} image(s) x {n_img} tokens"
        )
    out = model(
        input_ids=input_ids,
        pixel_values=None if pixel_values is None else pixel_values.float(),
        attention_mask=attention_mask,
        use_cache=False,
    )
    return out.logits.float()


# ---------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------

# transformers 5.x in-memory prefixes (what model.state_dict() gives with 5.23).
_MEM_VISION = "model.vision_tower."
_MEM_PROJ = "model.multi_modal_projector."
_MEM_LM = "model.language_model."
_MEM_HEAD = "lm_head.weight"

_D_PROJ = {"linear_1": "model.mm_projector.0", "linear_2": "model.mm_projector.2"}
_D_FROZEN_TOWER = "model.vision_tower.vision_tower.vision_model."


def _normalize_layout(layout: str, vision_model_prefix: bool | None) -> tuple[str, bool]:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "A'":
        if vision_model_prefix:
            raise ValueError("layout A' has no vision_model. prefix by definition")
        return "A", False
    if layout == "A":
        return "A", True if vision_model_prefix is None else bool(vision_model_prefix)
    if vision_model_prefix is not None:
        raise ValueError(f"vision_model_prefix only applies to layout A (got layout {layout})")
    return layout, layout in ("B", "D")


def _split_memory_state_dict(model: LlavaForConditionalGeneration):
    """The 5.x in-memory state dict split into (vision, projector, lm, lm_head) parts."""
    vision, proj, lm, head = {}, {}, {}, None
    for key, tensor in model.state_dict().items():
        t = tensor.detach()
        if key.startswith(_MEM_VISION):
            vision[key[len(_MEM_VISION) :]] = t
        elif key.startswith(_MEM_PROJ):
            proj[key[len(_MEM_PROJ) :]] = t
        elif key.startswith(_MEM_LM):
            lm[key[len(_MEM_LM) :]] = t
        elif key == _MEM_HEAD:
            head = t
        else:
            raise RuntimeError(f"unexpected key in the transformers state dict: {key}")
    if head is None:
        raise RuntimeError("lm_head.weight missing from the state dict")
    if any(k.startswith("vision_model.") for k in vision):
        # transformers 4.52-4.57 kept CLIPVisionModel's inner vision_model; strip it.
        vision = {k.removeprefix("vision_model."): v for k, v in vision.items()}
    return vision, proj, lm, head


def _position_ids(model: LlavaForConditionalGeneration) -> torch.Tensor:
    vc = model.config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2 + 1
    return torch.arange(n, dtype=torch.int64).unsqueeze(0)


def layout_state_dict(
    model: LlavaForConditionalGeneration,
    layout: str,
    *,
    vision_model_prefix: bool | None = None,
    position_ids: bool = False,
    text_vocab_size: int | None = None,
    include_frozen_tower: bool = False,
    dtype: torch.dtype | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """The tensors a checkpoint of ``layout`` holds, as ``{"model": {...}, "clip": {...}}``.

    ``"clip"`` is only non-empty for D (``vision_model.*`` keys, the separate CLIP tower).
    Options:
      - ``vision_model_prefix`` (A only): True = transformers 4.52-4.57 names (default for A),
        False = transformers 5.x names (same as layout ``"A'"``);
      - ``position_ids``: also write CLIP's ``embeddings.position_ids`` buffer (int64
        ``[1, n_patches + 1]``) as old checkpoints such as openai/clip-vit-large-patch14-336 do;
        a loader must drop it;
      - ``text_vocab_size`` (D): rows of embed_tokens / lm_head kept (default
        ``config.image_token_index``, i.e. the SentencePiece vocab);
      - ``include_frozen_tower`` (D): also put the (frozen, identical) CLIP weights under
        ``model.vision_tower.vision_tower.vision_model.*`` in the LLM files, as self-trained
        original-LLaVA checkpoints saved by DeepSpeed do (the released llava-v1.5-7b was
        consolidated without them; haotian-liu/LLaVA#672);
      - ``dtype``: cast floating tensors (e.g. torch.float16 like the released checkpoints).
    All tensors are contiguous copies (no shared storage).
    """
    layout, vm = _normalize_layout(layout, vision_model_prefix)
    vision, proj, lm, head = _split_memory_state_dict(model)
    if position_ids:
        vision = {**vision, "embeddings.position_ids": _position_ids(model)}
    vpre = "vision_model." if vm else ""
    out: dict[str, torch.Tensor] = {}
    clip: dict[str, torch.Tensor] = {}
    if layout == "A":
        out.update({f"model.vision_tower.{vpre}{k}": v for k, v in vision.items()})
        out.update({f"model.multi_modal_projector.{k}": v for k, v in proj.items()})
        out.update({f"model.language_model.{k}": v for k, v in lm.items()})
        out["lm_head.weight"] = head
    elif layout in ("B", "C"):
        out.update({f"vision_tower.{vpre}{k}": v for k, v in vision.items()})
        out.update({f"multi_modal_projector.{k}": v for k, v in proj.items()})
        out.update({f"language_model.model.{k}": v for k, v in lm.items()})
        out["language_model.lm_head.weight"] = head
    else:  # D
        n_text = text_vocab_size or model.config.image_token_index
        if n_text > model.config.image_token_index:
            raise ValueError(
                f"text_vocab_size {n_text} would include the image token "
                f"{model.config.image_token_index}"
            )
        for k, v in lm.items():
            out[f"model.{k}"] = v[:n_text] if k == "embed_tokens.weight" else v
        out["lm_head.weight"] = head[:n_text]
        for k, v in proj.items():
            linear, leaf = k.split(".", 1)
            out[f"{_D_PROJ[linear]}.{leaf}"] = v
        clip = {f"vision_model.{k}": v for k, v in vision.items()}
        if include_frozen_tower:
            out.update({f"{_D_FROZEN_TOWER}{k}": v for k, v in vision.items()})

    def finish(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        res = {}
        for k, v in sd.items():
            if dtype is not None and v.is_floating_point():
                v = v.to(dtype)
            res[k] = v.detach().clone().contiguous()
        return res

    return {"model": finish(out), "clip": finish(clip)}


def _shard_names(fmt: str, shards: int) -> list[str]:
    if fmt == "safetensors":
        stem, ext = "model", "safetensors"
    elif fmt == "bin":
        stem, ext = "pytorch_model", "bin"
    else:
        raise ValueError(f"fmt must be 'safetensors' or 'bin', got {fmt!r}")
    if shards == 1:
        return [f"{stem}.{ext}"]
    return [f"{stem}-{i:05d}-of-{shards:05d}.{ext}" for i in range(1, shards + 1)]


def _index_name(fmt: str) -> str:
    if fmt == "safetensors":
        return "model.safetensors.index.json"
    return "pytorch_model.bin.index.json"


def _write_weights(
    state_dict: Mapping[str, torch.Tensor], out_dir: Path, fmt: str, shards: int
) -> list[Path]:
    """Write ``state_dict`` as HF-named file(s) (+ index when sharded). Keys are split into
    ``shards`` contiguous groups of about equal byte size, in insertion order."""
    from safetensors.torch import save_file

    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    keys = list(state_dict)
    if shards > len(keys):
        raise ValueError(f"cannot split {len(keys)} tensors into {shards} shards")
    names = _shard_names(fmt, shards)
    sizes = [state_dict[k].numel() * state_dict[k].element_size() for k in keys]
    total = sum(sizes)
    # Greedy split by cumulative size, keeping at least one tensor per shard.
    groups: list[list[str]] = [[] for _ in range(shards)]
    acc, g = 0, 0
    for i, (k, s) in enumerate(zip(keys, sizes)):
        remaining_keys = len(keys) - i
        remaining_groups = shards - g - 1
        if groups[g] and g < shards - 1 and (
            acc >= total * (g + 1) / shards or remaining_keys <= remaining_groups
        ):
            g += 1
        groups[g].append(k)
        acc += s
    assert all(groups) and sum(map(len, groups)) == len(keys)

    paths = []
    weight_map = {}
    for name, group in zip(names, groups):
        part = {k: state_dict[k] for k in group}
        path = out_dir / name
        if fmt == "safetensors":
            save_file(part, str(path), metadata={"format": "pt"})
        else:
            torch.save(part, path)
        paths.append(path)
        weight_map.update({k: name for k in group})
    if shards > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / _index_name(fmt)).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return paths


def _write_hf_config(model: LlavaForConditionalGeneration, out_dir: Path, dtype) -> Path:
    """config.json (+ generation_config.json) as ``save_pretrained`` writes them."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.dtype = str(dtype or model.dtype).removeprefix("torch.")
    config.save_pretrained(out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    return out_dir / "config.json"


def original_llava_config(
    config: LlavaConfig,
    *,
    mm_vision_tower: str = "openai/clip-vit-large-patch14-336",
    style: str = "llava_llama",
    text_vocab_size: int | None = None,
    dtype: str = "float32",
) -> dict:
    """An original-LLaVA ``config.json`` (top-level Llama fields + ``mm_*`` fields).

    ``style="v1.5"`` reproduces the field set of the released liuhaotian/llava-v1.5-7b
    (LLaVA code of Oct 2023, transformers 4.31: ``model_type "llava"``, no ``rope_theta``).
    ``style="llava_llama"`` is what the later LLaVA code (v1.2+, transformers 4.37.2) writes
    for checkpoints fine-tuned from it, such as POVID's: ``model_type "llava_llama"``,
    ``rope_theta``, ``attention_bias``, ``mm_patch_merge_type``, ``tokenizer_*`` ...
    A loader must accept both (and must not rely on ``model_type``).
    """
    tc, vc = config.text_config, config.vision_config
    n_text = text_vocab_size or config.image_token_index
    cfg = {
        "architectures": ["LlavaLlamaForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False,
        "freeze_mm_vision_resampler": False,
        "hidden_act": tc.hidden_act,
        "hidden_size": tc.hidden_size,
        "image_aspect_ratio": "pad",
        "initializer_range": 0.02,
        "intermediate_size": tc.intermediate_size,
        "max_length": tc.max_position_embeddings,
        "max_position_embeddings": tc.max_position_embeddings,
        "mm_hidden_size": vc.hidden_size,
        "mm_projector_type": "mlp2x_gelu",
        "mm_resampler_type": None,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": False,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": mm_vision_tower,
        "model_type": "llava",
        "num_attention_heads": tc.num_attention_heads,
        "num_hidden_layers": tc.num_hidden_layers,
        "num_key_value_heads": tc.num_key_value_heads,
        "pad_token_id": 0,
        "pretraining_tp": 1,
        "rms_norm_eps": tc.rms_norm_eps,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "transformers_version": "4.31.0",
        "tune_mm_mlp_adapter": False,
        "tune_mm_vision_resampler": False,
        "unfreeze_mm_vision_tower": False,
        "use_cache": True,
        "use_mm_proj": True,
        "vocab_size": n_text,
    }
    if style == "v1.5":
        return cfg
    if style != "llava_llama":
        raise ValueError(f"style must be 'v1.5' or 'llava_llama', got {style!r}")
    rope = getattr(tc, "rope_parameters", None) or {}
    rope_theta = rope.get("rope_theta", getattr(tc, "rope_theta", 10000.0))
    cfg.update(
        {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "mm_patch_merge_type": "flat",
            "mm_projector_lr": None,
            "model_type": "llava_llama",
            "rope_theta": float(rope_theta),
            "tokenizer_model_max_length": tc.max_position_embeddings,
            "tokenizer_padding_side": "right",
            "transformers_version": "4.37.2",
        }
    )
    return dict(sorted(cfg.items()))


def _clean_config_dict(d: dict) -> dict:
    drop = ("transformers_version", "architectures", "dtype", "torch_dtype", "output_attentions",
            "output_hidden_states", "return_dict", "chunk_size_feed_forward", "id2label",
            "label2id", "problem_type", "_name_or_path", "is_encoder_decoder")
    return {k: v for k, v in d.items() if k not in drop}


def _write_clip_dir(
    model: LlavaForConditionalGeneration,
    clip_sd: dict[str, torch.Tensor],
    clip_dir: Path,
    clip_style: str,
    fmt: str,
    seed: int,
) -> list[Path]:
    """Write the separate CLIP tower directory of layout D."""
    clip_dir.mkdir(parents=True, exist_ok=True)
    vc = model.config.vision_config
    vdict = _clean_config_dict(vc.to_dict())
    if clip_style == "vision_model":
        # What CLIPVisionModel.save_pretrained wrote before transformers 5: vision_model.* keys.
        sd = clip_sd
        config = {"architectures": ["CLIPVisionModel"], **vdict, "model_type": "clip_vision_model"}
    elif clip_style == "clip_model":
        # What openai/clip-vit-large-patch14-336 ships: a whole CLIPModel (text tower, projections,
        # logit_scale) with a nested vision_config; LLaVA loads its vision half.
        gen = torch.Generator().manual_seed(seed + 1)
        text_cfg = CLIPTextConfig(
            vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
            num_attention_heads=2, max_position_embeddings=8, projection_dim=vc.projection_dim,
            bos_token_id=0, eos_token_id=2, pad_token_id=1,
        )
        sd = dict(clip_sd)
        h, i = text_cfg.hidden_size, text_cfg.intermediate_size
        t = {
            "text_model.embeddings.token_embedding.weight": (text_cfg.vocab_size, h),
            "text_model.embeddings.position_embedding.weight": (
                text_cfg.max_position_embeddings, h),
            "text_model.final_layer_norm.weight": (h,),
            "text_model.final_layer_norm.bias": (h,),
            "text_projection.weight": (text_cfg.projection_dim, h),
            "visual_projection.weight": (vc.projection_dim, vc.hidden_size),
        }
        pre = "text_model.encoder.layers.0."
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            t[f"{pre}self_attn.{n}.weight"] = (h, h)
            t[f"{pre}self_attn.{n}.bias"] = (h,)
        t.update({f"{pre}layer_norm1.weight": (h,), f"{pre}layer_norm1.bias": (h,),
                  f"{pre}layer_norm2.weight": (h,), f"{pre}layer_norm2.bias": (h,),
                  f"{pre}mlp.fc1.weight": (i, h), f"{pre}mlp.fc1.bias": (i,),
                  f"{pre}mlp.fc2.weight": (h, i), f"{pre}mlp.fc2.bias": (h,)})
        for k, shape in t.items():
            sd[k] = 0.1 * torch.randn(shape, generator=gen)
        sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
        if "vision_model.embeddings.position_ids" in clip_sd:
            sd["text_model.embeddings.position_ids"] = torch.arange(
                text_cfg.max_position_embeddings
            ).unsqueeze(0)
        tdict = _clean_config_dict(text_cfg.to_dict())
        config = {
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": vc.projection_dim,
            "logit_scale_init_value": 2.6592,
            "text_config": {**tdict, "model_type": "clip_text_model"},
            "vision_config": {**vdict, "model_type": "clip_vision_model"},
        }
    elif clip_style == "transformers5":
        # What CLIPVisionModel.save_pretrained writes with transformers 5.x: no vision_model.
        sd = {k.removeprefix("vision_model."): v for k, v in clip_sd.items()}
        config = {"architectures": ["CLIPVisionModel"], **vdict, "model_type": "clip_vision_model"}
    else:
        raise ValueError(
            "clip_style must be 'vision_model', 'clip_model' or 'transformers5', "
            f"got {clip_style!r}"
        )
    config["transformers_version"] = transformers.__version__
    (clip_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    preprocessor = {
        "crop_size": vc.image_size,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": list(CLIP_MEAN),
        "image_std": list(CLIP_STD),
        "resample": 3,
        "size": vc.image_size,
    }
    (clip_dir / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2) + "\n")
    return _write_weights(sd, clip_dir, fmt, 1)


def save_llava_layout(
    model: LlavaForConditionalGeneration,
    out_dir: str | Path,
    layout: str,
    *,
    fmt: str = "safetensors",
    shards: int = 1,
    clip_dir: str | Path | None = None,
    vision_model_prefix: bool | None = None,
    position_ids: bool = False,
    text_vocab_size: int | None = None,
    include_frozen_tower: bool = False,
    d_config_style: str = "llava_llama",
    clip_style: str = "vision_model",
    clip_fmt: str | None = None,
    mm_vision_tower: str | None = None,
    dtype: torch.dtype | None = None,
    use_save_pretrained: bool | None = None,
) -> dict:
    """Write ``model``'s weights to ``out_dir`` in exactly one layout (see module docstring).

    Args:
        layout: "A", "A'", "B", "C" or "D".
        fmt: "safetensors" (``model.safetensors`` / ``model-0000i-of-0000n.safetensors``) or
            "bin" (``pytorch_model.bin`` / ``pytorch_model-0000i-of-0000n.bin``, ``torch.save`` of
            a dict); with ``shards > 1`` also ``model.safetensors.index.json`` /
            ``pytorch_model.bin.index.json`` (``{"metadata": {"total_size"}, "weight_map"}``).
        shards: number of weight files.
        clip_dir: D only: where the CLIP tower goes (default: sibling ``<out_dir>-clip``).
        vision_model_prefix, position_ids, text_vocab_size, include_frozen_tower, dtype:
            see :func:`layout_state_dict`.
        d_config_style: D only: "llava_llama" (default) or "v1.5", see
            :func:`original_llava_config`.
        clip_style: D only: "vision_model" (default; ``vision_model.*`` keys, config
            ``model_type clip_vision_model``), "clip_model" (a whole CLIPModel like
            openai/clip-vit-large-patch14-336, with a random tiny text tower) or "transformers5"
            (no ``vision_model.`` prefix, what 5.x ``CLIPVisionModel.save_pretrained`` writes).
        clip_fmt: D only: format of the CLIP weights (default: ``fmt``).
        mm_vision_tower: D only: value of ``mm_vision_tower`` (default: ``str(clip_dir)``).
        use_save_pretrained: C only: write with ``model.save_pretrained`` itself (default: True
            when possible, i.e. safetensors, one shard, no extra options; otherwise the same
            keys are written by hand).

    A-C also get ``config.json`` / ``generation_config.json`` as ``save_pretrained`` writes
    them (llava-hf style: ``text_config`` / ``vision_config`` nested); D gets an original-LLaVA
    ``config.json`` and no generation config. No tokenizer is written: see
    :func:`write_tiny_tokenizer`.

    Returns:
        ``{"layout", "out_dir", "files", "index", "config", "keys", "clip_dir", "clip_files",
        "clip_config", "clip_keys", "text_vocab_size", "image_token_index", "fmt", "shards"}``
        (paths as ``Path``; ``index`` / ``clip_*`` are None when not written).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    norm_layout, vm = _normalize_layout(layout, vision_model_prefix)
    sds = layout_state_dict(
        model,
        layout,
        vision_model_prefix=vision_model_prefix,
        position_ids=position_ids,
        text_vocab_size=text_vocab_size,
        include_frozen_tower=include_frozen_tower,
        dtype=dtype,
    )
    info: dict = {
        "layout": layout if layout != "A" else ("A" if vm else "A'"),
        "out_dir": out_dir,
        "fmt": fmt,
        "shards": shards,
        "index": (out_dir / _index_name(fmt)) if shards > 1 else None,
        "keys": sorted(sds["model"]),
        "image_token_index": model.config.image_token_index,
        "text_vocab_size": None,
        "clip_dir": None,
        "clip_files": None,
        "clip_config": None,
        "clip_keys": None,
    }
    simple = fmt == "safetensors" and shards == 1 and not position_ids and dtype is None
    if norm_layout == "C" and (use_save_pretrained or (use_save_pretrained is None and simple)):
        if not simple:
            raise ValueError("save_pretrained writes one safetensors file without extra options")
        model.save_pretrained(out_dir)
        info["files"] = [out_dir / "model.safetensors"]
        info["config"] = out_dir / "config.json"
        return info

    info["files"] = _write_weights(sds["model"], out_dir, fmt, shards)
    if norm_layout != "D":
        info["config"] = _write_hf_config(model, out_dir, dtype)
        return info

    clip_dir = Path(clip_dir) if clip_dir is not None else out_dir.with_name(out_dir.name + "-clip")
    n_text = text_vocab_size or model.config.image_token_index
    dtype_name = str(dtype or torch.float32).removeprefix("torch.")
    cfg = original_llava_config(
        model.config,
        mm_vision_tower=mm_vision_tower or str(clip_dir),
        style=d_config_style,
        text_vocab_size=n_text,
        dtype=dtype_name,
    )
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    info["config"] = out_dir / "config.json"
    info["text_vocab_size"] = n_text
    info["clip_dir"] = clip_dir
    info["clip_files"] = _write_clip_dir(
        model, sds["clip"], clip_dir, clip_style, clip_fmt or fmt, seed=0
    )
    info["clip_config"] = clip_dir / "config.json"
    info["clip_keys"] = sorted(read_checkpoint_dir(clip_dir))
    return info


def read_checkpoint_dir(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF-style checkpoint directory (single file or sharded + index,
    safetensors or .bin). Raises if the index and the shard contents disagree."""
    from safetensors.torch import load_file

    path = Path(path)
    for fmt in ("safetensors", "bin"):
        index = path / _index_name(fmt)
        single = path / _shard_names(fmt, 1)[0]
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map, files = None, [single.name]
        else:
            continue
        out: dict[str, torch.Tensor] = {}
        for name in files:
            f = path / name
            part = load_file(str(f)) if fmt == "safetensors" else torch.load(f, weights_only=True)
            dup = set(part) & set(out)
            if dup:
                raise ValueError(f"keys in several shards: {sorted(dup)[:3]}")
            if weight_map is not None:
                wrong = [k for k in part if weight_map.get(k) != name]
                if wrong:
                    raise ValueError(f"{name} holds keys the index puts elsewhere: {wrong[:3]}")
            out.update(part)
        if weight_map is not None and set(weight_map) != set(out):
            raise ValueError("index weight_map and shard contents differ")
        return out
    raise FileNotFoundError(f"no model.safetensors / pytorch_model.bin (or index) in {path}")


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the user's questions."
)
_SUBJECTS = ["cat", "dog", "man", "woman", "child", "bird", "horse", "car", "bus", "train",
             "boat", "table", "chair", "cup", "plate", "pizza", "bench", "kite", "clock", "bike"]
_COLORS = ["red", "blue", "green", "yellow", "white", "black", "brown", "gray", "orange", "pink"]
_PLACES = ["on a street", "in a kitchen", "near the water", "in a park", "on the grass",
           "next to a building", "under a tree", "in a living room", "at the beach", "on a field"]
_VERBS = ["is sitting", "is standing", "is lying", "is parked", "is resting", "is waiting"]
_QUESTIONS = ["Describe the image in detail.", "What is in the picture?",
              "What color is the {s}?", "How many {s}s are there?", "Where is the {s}?"]


def tiny_corpus() -> list[str]:
    """A fixed English corpus of image-description sentences and vicuna_v1 prompts."""
    sents = [_SYSTEM]
    n = 0
    for i, s in enumerate(_SUBJECTS):
        for j, c in enumerate(_COLORS):
            p = _PLACES[(i + j) % len(_PLACES)]
            v = _VERBS[(i * 3 + j) % len(_VERBS)]
            o = _SUBJECTS[(i + 2 * j + 1) % len(_SUBJECTS)]
            k = 1 + (i + j) % 4
            sents.append(f"A {c} {s} {v} {p}, next to {k} {o}s.")
            if (i + j) % 3 == 0:
                q = _QUESTIONS[n % len(_QUESTIONS)].format(s=s)
                sents.append(
                    f"{_SYSTEM} USER: <image>\n{q} ASSISTANT: The image shows a {c} {s} {p}.</s>"
                )
                n += 1
    sents.append("There are 2 people, 3 cups and 10 plates; the photo was taken in 2014.")
    return sents


def write_tiny_tokenizer(out_dir: str | Path, vocab_size: int = TEXT_VOCAB) -> Path:
    """Train a Llama-style SentencePiece model (unk 0, bos 1, eos 2, byte fallback, dummy
    prefix, BPE) on :func:`tiny_corpus` and write ``<out_dir>/tokenizer.model``.

    Uses ``povid_data.tokenizer.train_sentencepiece`` (the toolkit's trainer). Asserts that
    the model has exactly ``vocab_size`` pieces (the tiny twin of Llama's 32000), since the
    trainer allows smaller vocabularies on small corpora. Deterministic.
    """
    from povid_data.tokenizer import train_sentencepiece

    path = Path(train_sentencepiece(Path(out_dir), tiny_corpus(), vocab_size=vocab_size, seed=0))
    import sentencepiece as spm

    n = spm.SentencePieceProcessor(model_file=str(path)).get_piece_size()
    if n != vocab_size:
        raise RuntimeError(f"tokenizer has {n} pieces, expected {vocab_size}: corpus too small")
    return path

