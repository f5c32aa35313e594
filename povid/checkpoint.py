"""Loading and saving LLaVA-1.5 checkpoints in the layouts found in the wild.

Every layout is first normalised to one canonical naming, then mapped to our torchtune keys
(see :mod:`povid.model`); saving goes the other way and always writes layout B (published
llava-hf files), which transformers' ``LlavaForConditionalGeneration`` and vLLM load.

Canonical names::

    vision.<CLIPVisionTransformer key>       e.g. vision.encoder.layers.3.mlp.fc1.weight
    projector.linear_{1,2}.{weight,bias}
    lm.<HF LlamaForCausalLM key>             e.g. lm.model.layers.0.self_attn.q_proj.weight

Layouts (DESIGN.md section 2):
    A  transformers in memory: model.vision_tower.(vision_model.)*, model.multi_modal_projector.*,
       model.language_model.*, lm_head.weight
    B  llava-hf files: vision_tower.vision_model.*, multi_modal_projector.*, language_model.model.*,
       language_model.lm_head.weight
    C  transformers 5 save_pretrained: B without ``vision_model.``
    D  original LLaVA: model.*, model.mm_projector.{0,2}.*, lm_head.weight; the CLIP tower lives
       in a separate directory (vision_model.*)
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torchtune.models import convert_weights

from povid.model import LlavaArgs, read_llava_args

__all__ = [
    "LlavaCheckpointer",
    "load_weight_files",
    "to_canonical",
    "canonical_to_tune",
    "tune_to_canonical",
    "canonical_to_llava_hf",
    "load_model_state",
    "llava_hf_config",
    "save_llava_hf",
    "load_llava",
]

StateDict = Dict[str, torch.Tensor]

# (prefix in the file, canonical prefix). Longest prefix wins, so order here does not matter.
_PREFIX_RULES: List[Tuple[str, str]] = [
    ("model.vision_tower.vision_tower.vision_model.", "vision."),  # D saved with its tower
    ("model.vision_tower.vision_model.", "vision."),  # A
    ("model.vision_tower.", "vision."),  # A, transformers 5 in memory
    ("model.multi_modal_projector.", "projector."),  # A
    ("model.language_model.", "lm.model."),  # A
    ("vision_tower.vision_model.", "vision."),  # B
    ("vision_tower.", "vision."),  # C
    ("multi_modal_projector.", "projector."),  # B, C
    ("language_model.model.", "lm.model."),  # B, C
    ("language_model.lm_head.", "lm.lm_head."),  # B, C
    ("model.mm_projector.0.", "projector.linear_1."),  # D
    ("model.mm_projector.2.", "projector.linear_2."),  # D
    ("model.", "lm.model."),  # D
    ("lm_head.", "lm.lm_head."),  # A, D
    ("vision_model.", "vision."),  # a CLIP directory (CLIPVisionModel or CLIPModel)
]
_PREFIX_RULES.sort(key=lambda rule: -len(rule[0]))

# Buffers some checkpoints carry that are recomputed by the model.
_IGNORED = re.compile(r"(position_ids|rotary_emb\.inv_freq)$")

_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Files copied next to saved weights so the output directory is self-contained.
_SIDE_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "generation_config.json", "preprocessor_config.json",
    "processor_config.json", "chat_template.json", "chat_template.jinja",
)  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Reading weight files
# ---------------------------------------------------------------------------------------------


def _weight_files(directory: Path) -> List[Path]:
    for index_name in _WEIGHT_INDEXES:
        index = directory / index_name
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a valid weight index ({e!r})") from None
            files = [directory / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.exists()]
            if missing:
                raise FileNotFoundError(f"{index}: shard files missing: {missing}")
            return files
    for name in _WEIGHT_FILES:
        if (directory / name).exists():
            return [directory / name]
    found = sorted(p.name for p in directory.glob("*.safetensors")) + sorted(
        p.name for p in directory.glob("*.bin")
    )
    if found:  # e.g. a single shard left without its index, or oddly named files
        return [directory / name for name in found]
    raise FileNotFoundError(
        f"{directory}: no model weights found (expected one of "
        f"{', '.join(_WEIGHT_INDEXES + _WEIGHT_FILES)})"
    )


def _read_one(path: Path) -> StateDict:
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except (SafetensorError, RuntimeError, OSError, EOFError, ValueError) as e:
        raise ValueError(f"{path}: cannot read weights ({type(e).__name__}: {e})") from None


def load_weight_files(directory: str | Path) -> StateDict:
    """All tensors of a checkpoint directory (safetensors or .bin, sharded with index or not)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: checkpoint directory not found")
    state: StateDict = {}
    for path in _weight_files(directory):
        state.update(_read_one(path))
    return state


# ---------------------------------------------------------------------------------------------
# Key mapping: file layout <-> canonical <-> torchtune
# ---------------------------------------------------------------------------------------------


def to_canonical(state: StateDict, source: str = "") -> Tuple[StateDict, List[str]]:
    """Rename any layout's keys to canonical names; returns ``(canonical, unrecognised keys)``."""
    canonical: StateDict = {}
    unrecognised: List[str] = []
    for key, tensor in state.items():
        if _IGNORED.search(key):
            continue
        for prefix, target in _PREFIX_RULES:
            if key.startswith(prefix):
                new_key = target + key[len(prefix) :]
                if new_key in canonical:
                    raise ValueError(f"{source}: two keys map to {new_key!r} (second: {key!r})")
                canonical[new_key] = tensor
                break
        else:
            unrecognised.append(key)
    return canonical, unrecognised


_VISION_LAYER_RENAMES = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.output_proj",
    "layer_norm1": "sa_norm",
    "layer_norm2": "mlp_norm",
    "mlp.fc1": "mlp.w1",
    "mlp.fc2": "mlp.w2",
}
_VISION_FIXED = {
    "embeddings.class_embedding": "clip.cls_token_embedding.weight",
    "embeddings.patch_embedding.weight": "clip.conv.weight",
    "embeddings.position_embedding.weight": "clip.token_pos_embedding.positional_embedding",
    "pre_layrnorm.weight": "clip.ln_pre.weight",
    "pre_layrnorm.bias": "clip.ln_pre.bias",
    "post_layernorm.weight": "clip_tail.ln_post.weight",
    "post_layernorm.bias": "clip_tail.ln_post.bias",
}
_VISION_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_ENCODER = "encoders.image."


def _vision_to_tune(key: str, used_layers: int) -> Optional[str]:
    if key in _VISION_FIXED:
        return _ENCODER + _VISION_FIXED[key]
    match = _VISION_LAYER.match(key)
    if not match or match.group(2) not in _VISION_LAYER_RENAMES:
        return None
    index, module, kind = int(match.group(1)), _VISION_LAYER_RENAMES[match.group(2)], match.group(3)
    where = f"clip.layers.{index}" if index < used_layers else f"clip_tail.layers.{index - used_layers}"
    return f"{_ENCODER}{where}.{module}.{kind}"


def _vision_from_tune(key: str, used_layers: int) -> str:
    rest = key[len(_ENCODER) :]
    for hf, ours in _VISION_FIXED.items():
        if rest == ours:
            return hf
    match = re.match(r"(clip|clip_tail)\.layers\.(\d+)\.(.+)\.(weight|bias)$", rest)
    if not match:
        raise KeyError(f"unexpected vision key {key!r}")
    index = int(match.group(2)) + (used_layers if match.group(1) == "clip_tail" else 0)
    hf_module = {v: k for k, v in _VISION_LAYER_RENAMES.items()}[match.group(3)]
    return f"encoder.layers.{index}.{hf_module}.{match.group(4)}"


def _llama_dims(args: LlavaArgs) -> dict:
    return dict(
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        dim=args.embed_dim,
        head_dim=args.embed_dim // args.num_heads,
    )


def canonical_to_tune(canonical: StateDict, args: LlavaArgs) -> Tuple[StateDict, List[str]]:
    """Canonical names to our model's keys; returns ``(state, canonical keys not understood)``."""
    tune: StateDict = {}
    llama: StateDict = {}
    not_understood: List[str] = []
    used = args.vision_layers_used
    for key, tensor in canonical.items():
        if key.startswith("vision."):
            new_key = _vision_to_tune(key[len("vision.") :], used)
        elif key.startswith("projector."):
            new_key = _ENCODER + key
        elif key.startswith("lm."):
            llama[key[len("lm.") :]] = tensor
            continue
        else:
            new_key = None
        if new_key is None:
            not_understood.append(key)
        else:
            tune[new_key] = tensor
    known = {}
    for key, tensor in llama.items():
        try:
            convert_weights.get_mapped_key(key, convert_weights._FROM_HF)
            known[key] = tensor
        except Exception:
            not_understood.append("lm." + key)
    # torchtune's converter also undoes HF's rotary permutation of q/k.
    for key, tensor in convert_weights.hf_to_tune(known, **_llama_dims(args)).items():
        tune["decoder." + key] = tensor
    return tune, not_understood


def tune_to_canonical(state: StateDict, args: LlavaArgs) -> StateDict:
    """Our model's keys to canonical names (inverse of :func:`canonical_to_tune`)."""
    canonical: StateDict = {}
    llama: StateDict = {}
    used = args.vision_layers_used
    for key, tensor in state.items():
        if key.startswith("decoder."):
            llama[key[len("decoder.") :]] = tensor
        elif key.startswith(_ENCODER + "projector."):
            canonical[key[len(_ENCODER) :]] = tensor
        elif key.startswith(_ENCODER):
            canonical["vision." + _vision_from_tune(key, used)] = tensor
        else:
            raise KeyError(f"unexpected model key {key!r}")
    for key, tensor in convert_weights.tune_to_hf(llama, **_llama_dims(args)).items():
        canonical["lm." + key] = tensor
    return canonical


def canonical_to_llava_hf(canonical: StateDict) -> StateDict:
    """Canonical names to layout B (published llava-hf files)."""
    out: StateDict = {}
    for key, tensor in canonical.items():
        if key.startswith("vision."):
            out["vision_tower.vision_model." + key[len("vision.") :]] = tensor
        elif key.startswith("projector."):
            out["multi_modal_projector." + key[len("projector.") :]] = tensor
        elif key.startswith("lm.model."):
            out["language_model.model." + key[len("lm.model.") :]] = tensor
        elif key.startswith("lm.lm_head."):
            out["language_model.lm_head." + key[len("lm.lm_head.") :]] = tensor
        else:
            raise KeyError(f"unexpected canonical key {key!r}")
    return out


# ---------------------------------------------------------------------------------------------
# Loading into a model with clear errors
# ---------------------------------------------------------------------------------------------


def _is_adapter_key(key: str) -> bool:
    return any(part in key for part in ("lora_a", "lora_b", "lora_magnitude", ".magnitude"))


def _preview(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def load_model_state(
    model: nn.Module, state: StateDict, source: str | Path, assign: bool = False
) -> None:
    """Load ``state`` into ``model``, naming missing, unexpected and mis-shaped keys.

    LoRA/DoRA adapter parameters may be absent (they start from their initialisation). DoRA
    magnitudes must be initialised by the caller after loading (torchtune's
    ``initialize_dora_magnitude``).
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not _is_adapter_key(k)]
    unexpected = [k for k in state if k not in expected]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_preview(unexpected)}")
    mis_shaped = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if mis_shaped:
        problems.append(f"shape mismatch in {len(mis_shaped)} tensors: {_preview(mis_shaped, 4)}")
    if problems:
        raise ValueError(f"{source}: checkpoint does not fit the model; " + "; ".join(problems))
    model.load_state_dict(state, strict=False, assign=assign)


# ---------------------------------------------------------------------------------------------
# Writing llava-hf configs
# ---------------------------------------------------------------------------------------------


def llava_hf_config(args: LlavaArgs, dtype: torch.dtype) -> dict:
    """A llava-hf ``config.json`` for ``args`` that transformers 4.52+ and 5.x load."""
    text = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": args.vocab_size,
        "hidden_size": args.embed_dim,
        "intermediate_size": args.intermediate_dim,
        "num_hidden_layers": args.num_layers,
        "num_attention_heads": args.num_heads,
        "num_key_value_heads": args.num_kv_heads,
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_base,
        "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_base},
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": args.pad_token_id,
    }
    vision = {
        "model_type": "clip_vision_model",
        "hidden_size": args.vision_embed_dim,
        "intermediate_size": args.vision_intermediate_dim,
        "num_hidden_layers": args.vision_num_layers,
        "num_attention_heads": args.vision_num_heads,
        "image_size": args.image_size,
        "patch_size": args.patch_size,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": args.vision_norm_eps,
        "projection_dim": 768,
    }
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "image_token_index": args.image_token_id,
        "image_seq_length": args.num_image_tokens,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "vision_feature_layer": args.vision_feature_layer,
        "vision_feature_select_strategy": args.vision_feature_select_strategy,
        "pad_token_id": args.pad_token_id,
        "tie_word_embeddings": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "text_config": text,
        "vision_config": vision,
    }


def _pad_vocab_for_hf(canonical: StateDict, args: LlavaArgs) -> Tuple[StateDict, LlavaArgs]:
    """Give an original-LLaVA vocabulary rows for ``<image>`` and ``<pad>``, as llava-hf did.

    transformers embeds ``input_ids`` before splicing the image, so the image id must be inside
    the embedding table. New rows are the mean of the existing ones; the vocabulary is padded
    to a multiple of 64 (32000 -> 32064).
    """
    old = args.vocab_size
    new = -(-(old + 2) // 64) * 64
    for key in ("lm.model.embed_tokens.weight", "lm.lm_head.weight"):
        weight = canonical[key]
        extra = weight.float().mean(0, keepdim=True).expand(new - old, -1).to(weight.dtype)
        canonical[key] = torch.cat([weight, extra])
    padded = LlavaArgs(**{**args.to_dict(), "vocab_size": new, "image_token_id": old})
    padded.pad_token_id = old + 1
    padded.source_format = "hf"
    padded.extra = {}
    return canonical, padded


def _save_sharded(state: StateDict, out_dir: Path, max_shard_bytes: int) -> None:
    shards: List[StateDict] = [{}]
    size = 0
    for key in sorted(state):
        tensor = state[key].detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    total = 0
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensor.numel() * tensor.element_size()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def save_llava_hf(
    state_dict: StateDict,
    args: LlavaArgs,
    out_dir: str | Path,
    *,
    source_config: Optional[dict] = None,
    copy_files_from: Optional[str | Path] = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Write our model's ``state_dict`` as a llava-hf checkpoint (layout B) with ``config.json``.

    Args:
        state_dict: our model's keys, LoRA merged.
        args: the model's architecture.
        out_dir: created if needed.
        source_config: a llava-hf config to write back (only the dtype is updated); by default
            one is generated from ``args``.
        copy_files_from: a directory whose tokenizer/processor files are copied along.
        max_shard_bytes: largest safetensors shard.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    canonical = tune_to_canonical(state_dict, args)
    if args.source_format == "original":
        canonical, args = _pad_vocab_for_hf(canonical, args)
    dtype = next(iter(state_dict.values())).dtype
    _save_sharded(canonical_to_llava_hf(canonical), out_dir, max_shard_bytes)
    if source_config is not None:
        config = {**source_config, "torch_dtype": str(dtype).removeprefix("torch.")}
    else:
        config = llava_hf_config(args, dtype)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if copy_files_from is not None:
        for side_file in _SIDE_FILES:
            if (Path(copy_files_from) / side_file).exists():
                shutil.copy2(Path(copy_files_from) / side_file, out_dir / side_file)
    return out_dir


# ---------------------------------------------------------------------------------------------
# The checkpointer
# ---------------------------------------------------------------------------------------------


_CLIP_VISION_ROOTS = ("embeddings.", "encoder.", "pre_layrnorm.", "post_layernorm.")


def _clip_dir_vision(raw: StateDict, clip_dir: str | Path) -> StateDict:
    """Canonical vision tensors from a CLIP directory.

    A whole CLIPModel (openai/clip-vit-large-patch14-336) also holds a text tower, which LLaVA
    does not use; transformers 5's ``CLIPVisionModel.save_pretrained`` drops ``vision_model.``.
    """
    prefixed = {k: v for k, v in raw.items() if k.startswith("vision_model.")}
    if prefixed:
        vision, _ = to_canonical(prefixed, str(clip_dir))
        return vision
    bare = {"vision." + k: v for k, v in raw.items() if k.startswith(_CLIP_VISION_ROOTS)}
    if not bare:
        raise ValueError(f"{clip_dir}: no CLIP vision tensors (`vision_model.*`) found")
    return {k: v for k, v in bare.items() if not _IGNORED.search(k)}


class LlavaCheckpointer:
    """Reads any supported LLaVA layout into our model's keys and writes llava-hf (layout B).

    Args:
        checkpoint_dir: directory with ``config.json`` and the weights.
        output_dir: where :meth:`save_checkpoint` writes (a sub-directory per save).
        clip_dir: for original-LLaVA checkpoints (layout D), a local CLIP ViT-L/14-336
            directory; defaults to the ``mm_vision_tower`` entry of ``config.json``.
        max_shard_bytes: largest safetensors shard written.
    """

    def __init__(
        self,
        checkpoint_dir: str | Path,
        output_dir: str | Path | None = None,
        clip_dir: str | Path | None = None,
        max_shard_bytes: int = 5 * 1024**3,
    ) -> None:
        self.checkpoint_dir = Path(checkpoint_dir)
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.args: LlavaArgs = read_llava_args(self.checkpoint_dir, clip_dir)
        self.max_shard_bytes = max_shard_bytes

    def load_checkpoint(self) -> Dict[str, StateDict]:
        """Returns ``{"model": state_dict}`` in our model's keys.

        Raises:
            FileNotFoundError: no weights or no CLIP tower for an original-LLaVA checkpoint.
            ValueError: keys that belong to no known layout, or required parts missing.
        """
        raw = load_weight_files(self.checkpoint_dir)
        canonical, unrecognised = to_canonical(raw, str(self.checkpoint_dir))
        if not any(k.startswith("vision.") for k in canonical):
            clip_dir = self.args.extra.get("clip_dir")
            if not clip_dir:
                raise ValueError(f"{self.checkpoint_dir}: the checkpoint has no vision tower weights")
            canonical.update(_clip_dir_vision(load_weight_files(clip_dir), clip_dir))
        state, not_understood = canonical_to_tune(canonical, self.args)
        if unrecognised or not_understood:
            raise ValueError(
                f"{self.checkpoint_dir}: keys of no known LLaVA layout: "
                f"{_preview(unrecognised + not_understood)}"
            )
        return {"model": state}

    def save_checkpoint(
        self,
        state_dict: StateDict,
        name: str = "model",
        adapter_state_dict: Optional[StateDict] = None,
        adapter_config: Optional[dict] = None,
    ) -> Path:
        """Write merged weights in layout B to ``output_dir/name`` (+ adapters if given).

        ``state_dict`` holds our model's keys with LoRA already merged (torchtune's
        ``get_merged_lora_ckpt``). The directory gets ``config.json`` and the tokenizer files
        of the source checkpoint, so transformers and our recipes load it as is.
        """
        if self.output_dir is None:
            raise ValueError("LlavaCheckpointer was created without an output_dir")
        out_dir = self.output_dir / name
        source_config = json.loads((self.checkpoint_dir / "config.json").read_text())
        save_llava_hf(
            state_dict,
            self.args,
            out_dir,
            # Keep every field of a llava-hf source config (transformers versions differ in
            # what they expect); an original-LLaVA config is rewritten.
            source_config=source_config if self.args.source_format == "hf" else None,
            copy_files_from=self.checkpoint_dir,
            max_shard_bytes=self.max_shard_bytes,
        )
        if adapter_state_dict is not None:
            self.save_adapter(adapter_state_dict, out_dir, adapter_config or {})
        return out_dir

    def save_adapter(self, adapter_state_dict: StateDict, out_dir: Path, adapter_config: dict) -> None:
        """Write LoRA adapters on their own: our keys (``adapter_model.pt``, for resuming) and
        PEFT-style keys in llava-hf naming (``adapter_model.safetensors`` + ``adapter_config.json``)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict.items()}
        torch.save(tensors, out_dir / "adapter_model.pt")
        decoder_part = {
            k[len("decoder.") :]: v for k, v in tensors.items() if k.startswith("decoder.")
        }
        peft = convert_weights.tune_to_peft_adapter_weights(decoder_part, **_llama_dims(self.args))
        # torchtune names the PEFT keys for a plain Llama; inside LLaVA the LLM sits under
        # `language_model.`.
        peft = {
            k.replace("base_model.model.", "base_model.model.language_model.", 1): v
            for k, v in peft.items()
        }
        save_file(peft, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", **adapter_config}
        if "target_modules" in config:
            config = convert_weights.tune_to_peft_adapter_config(config, str(self.checkpoint_dir))
        (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))


def load_llava(
    checkpoint_dir: str | Path,
    *,
    clip_dir: str | Path | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Build a full LLaVA from ``checkpoint_dir`` (any supported layout) for inference.

    The model is built on the meta device and the checkpoint tensors are assigned to it, so no
    time goes into a random initialisation that would be overwritten (minutes at 7B on CPU).
    """
    from povid.model import llava_1_5

    checkpointer = LlavaCheckpointer(checkpoint_dir, clip_dir=clip_dir)
    with torch.device("meta"):
        model = llava_1_5(checkpointer.args, decoder_trainable=False, projector_trainable=False)
    state = {k: v.to(device=device, dtype=dtype) for k, v in checkpointer.load_checkpoint()["model"].items()}
    load_model_state(model, state, checkpoint_dir, assign=True)
    for module in model.modules():
        # RoPE caches are non-persistent buffers: still on meta after loading.
        if hasattr(module, "rope_init"):
            with torch.device(device):
                module.rope_init()
    return model.eval()
