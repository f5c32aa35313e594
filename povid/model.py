"""LLaVA-1.5 built from torchtune components.

The model is a torchtune ``EarlyFusionModel``: a Llama-2 ``TransformerDecoder`` whose input
embeddings at the ``<image>`` placeholder positions are replaced, row-major, by the projected
CLIP patch features of the images. Every ``<image>`` in a prompt must therefore be expanded to
``LlavaArgs.num_image_tokens`` placeholder ids (576 for 336 px / patch 14).

State-dict keys (the checkpointer converts to and from transformers' layouts)::

    encoders.image.clip.*        CLIP layers up to the feature layer (+ patch/pos embeddings, ln_pre)
    encoders.image.clip_tail.*   CLIP layers after the feature layer and post_layernorm: kept so that
                                 checkpoints round-trip and parameter counts match, never run
    encoders.image.projector.*   linear_1 -> GELU -> linear_2
    decoder.*                    torchtune Llama-2 decoder (incl. decoder.tok_embeddings)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, List, Optional

import torch
from torch import nn
from torchtune.models.clip._component_builders import clip_mlp
from torchtune.models.clip._position_embeddings import TokenPositionalEmbedding
from torchtune.models.clip._text_encoder import QuickGELU
from torchtune.models.llama2 import llama2, lora_llama2
from torchtune.modules import (
    Fp32LayerNorm,
    MultiHeadAttention,
    RotaryPositionalEmbeddings,
    TransformerSelfAttentionLayer,
    VisionTransformer,
)
from torchtune.modules.model_fusion import EarlyFusionModel, register_fusion_module

__all__ = [
    "LlavaArgs",
    "LlavaProjector",
    "LlavaVisionEncoder",
    "LlavaFusionModel",
    "llava_1_5",
    "lora_llava_1_5",
    "llava_1_5_7b",
    "llava_1_5_13b",
    "lora_llava_1_5_7b",
    "lora_llava_1_5_13b",
    "qlora_llava_1_5_7b",
    "qlora_llava_1_5_13b",
    "llava_from_checkpoint",
    "lora_llava_from_checkpoint",
    "read_llava_args",
]


@dataclass
class LlavaArgs:
    """Architecture of a LLaVA-1.5-shaped model (CLIP ViT tower + MLP projector + Llama-2 LLM)."""

    # Llama decoder
    vocab_size: int = 32064
    embed_dim: int = 4096
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    intermediate_dim: int = 11008
    max_seq_len: int = 4096
    norm_eps: float = 1e-5
    rope_base: float = 10000.0
    # CLIP vision tower
    vision_embed_dim: int = 1024
    vision_num_layers: int = 24
    vision_num_heads: int = 16
    vision_intermediate_dim: int = 4096
    vision_norm_eps: float = 1e-5
    image_size: int = 336
    patch_size: int = 14
    # LLaVA glue
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"  # "default" drops CLS, "full" keeps it
    image_token_id: int = 32000
    pad_token_id: int = 0
    # where the layout came from ("hf" = llava-hf config.json, "original" = liuhaotian LLaVA)
    source_format: str = "hf"
    extra: dict = field(default_factory=dict)

    @property
    def num_image_tokens(self) -> int:
        """Number of placeholder tokens one ``<image>`` expands to."""
        patches = (self.image_size // self.patch_size) ** 2
        return patches + (1 if self.vision_feature_select_strategy == "full" else 0)

    @property
    def vision_layers_used(self) -> int:
        """CLIP layers that run: HF ``hidden_states[k]`` is the output of layer ``k``."""
        k = self.vision_feature_layer
        used = k if k >= 0 else self.vision_num_layers + 1 + k
        if not 0 <= used <= self.vision_num_layers:
            raise ValueError(
                f"vision_feature_layer={k} is out of range for {self.vision_num_layers} CLIP layers"
            )
        return used

    def to_dict(self) -> dict:
        """Plain-dict form (for JSON)."""
        return asdict(self)


# The two published LLaVA-1.5 sizes (llava-hf/llava-1.5-{7,13}b-hf).
LLAVA_1_5_7B = LlavaArgs()
LLAVA_1_5_13B = LlavaArgs(
    embed_dim=5120, num_layers=40, num_heads=40, num_kv_heads=40, intermediate_dim=13824
)


class LlavaProjector(nn.Module):
    """LLaVA-1.5's ``mlp2x_gelu`` projector: Linear -> GELU (exact erf) -> Linear, with biases."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim, bias=True)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(out_dim, out_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVisionEncoder(nn.Module):
    """CLIP tower cut at the feature layer, followed by the projector.

    ``forward(images)`` takes ``[n_images, 3, H, W]`` (already CLIP-normalised) and returns
    ``[n_images, num_image_tokens, decoder_dim]``, the rows ``EarlyFusionModel`` scatters into
    the placeholder positions.
    """

    def __init__(
        self,
        clip: VisionTransformer,
        clip_tail: nn.ModuleDict,
        projector: nn.Module,
        keep_cls: bool = False,
    ) -> None:
        super().__init__()
        self.clip = clip
        # Layers past the feature layer never influence the output; they are held (frozen) only so
        # that a loaded checkpoint saves back complete and parameter counts equal transformers'.
        self.clip_tail = clip_tail
        self.projector = projector
        self.keep_cls = keep_cls

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """CLIP features at the feature layer, ``[n_images, n_tokens, vision_dim]``."""
        if images.dim() != 4:
            raise ValueError(f"expected images of shape [n, 3, H, W], got {tuple(images.shape)}")
        x, _ = self.clip(images[:, None, None])  # VisionTransformer wants [b, n_imgs, tiles, c, h, w]
        x = x[:, 0, 0]
        return x if self.keep_cls else x[:, 1:]

    def forward(
        self,
        images: Optional[torch.Tensor] = None,
        row_index: Optional[torch.Tensor] = None,
        features: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Projected features per image, or per row when ``row_index`` maps rows to images.

        Preference training scores several answers (rows) per image: with ``row_index`` the
        tower runs once per image and its output is shared by every row that uses it.
        ``features`` (a previous call's output) skips the tower and projector altogether,
        e.g. for the reference pass while both are frozen.
        """
        if features is None:
            if images is None:
                raise ValueError("LlavaVisionEncoder needs images or features")
            features = self.projector(self.image_features(images))
        return features if row_index is None else features[row_index]


class LlavaFusionModel(EarlyFusionModel):
    """torchtune's ``EarlyFusionModel`` plus a check it lacks.

    ``EarlyFusionModel`` scatters image features into the placeholder positions with
    ``masked_scatter``, which silently misaligns a batch when the counts differ; here a
    mismatch raises instead.
    """

    def forward(self, tokens: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        image_id = self.encoder_tokens["image"]
        placeholders = int((tokens == image_id).sum())
        image_input = (kwargs.get("encoder_input") or {}).get("image")
        if image_input is None:
            images = 0
        elif image_input.get("row_index") is not None:
            images = len(image_input["row_index"])
        elif image_input.get("features") is not None:
            images = image_input["features"].shape[0]
        else:
            images = image_input["images"].shape[0]
        per_image = self.llava_args.num_image_tokens
        if placeholders != images * per_image:
            raise ValueError(
                f"{placeholders} image placeholder tokens in the batch, but {images} image(s) x "
                f"{per_image} features were given: each <image> must expand to {per_image} "
                f"placeholders, one image per <image>"
            )
        return super().forward(tokens, **kwargs)


def _clip_layer(embed_dim: int, num_heads: int, intermediate_dim: int, eps: float) -> nn.Module:
    head_dim = embed_dim // num_heads
    attn = MultiHeadAttention(
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_kv_heads=num_heads,
        head_dim=head_dim,
        q_proj=nn.Linear(embed_dim, embed_dim, bias=True),
        k_proj=nn.Linear(embed_dim, embed_dim, bias=True),
        v_proj=nn.Linear(embed_dim, embed_dim, bias=True),
        output_proj=nn.Linear(embed_dim, embed_dim, bias=True),
        pos_embeddings=None,
        attn_dropout=0.0,
        is_causal=False,
    )
    # torchtune's clip_vision_encoder fixes the MLP at 4x width and SiLU; CLIP uses QuickGELU
    # and its width comes from the checkpoint config.
    mlp = clip_mlp(
        in_dim=embed_dim, hidden_dim=intermediate_dim, out_dim=embed_dim, activation=QuickGELU()
    )
    return TransformerSelfAttentionLayer(
        attn=attn,
        mlp=mlp,
        sa_norm=Fp32LayerNorm(embed_dim, eps=eps),
        mlp_norm=Fp32LayerNorm(embed_dim, eps=eps),
    )


def llava_vision_encoder(args: LlavaArgs) -> LlavaVisionEncoder:
    """CLIP ViT (QuickGELU) cut at ``args.vision_feature_layer`` plus the LLaVA projector."""
    if args.vision_embed_dim % args.vision_num_heads:
        raise ValueError("vision_embed_dim must be divisible by vision_num_heads")
    if args.vision_feature_select_strategy not in ("default", "full"):
        raise ValueError(
            f"vision_feature_select_strategy must be 'default' or 'full', "
            f"got {args.vision_feature_select_strategy!r}"
        )
    used = args.vision_layers_used

    def layer() -> nn.Module:
        return _clip_layer(
            args.vision_embed_dim,
            args.vision_num_heads,
            args.vision_intermediate_dim,
            args.vision_norm_eps,
        )

    clip = VisionTransformer(
        patch_size=args.patch_size,
        tile_size=args.image_size,
        num_layers=used,
        embed_dim=args.vision_embed_dim,
        layer=layer(),
        token_pos_embedding=TokenPositionalEmbedding(
            embed_dim=args.vision_embed_dim, patch_size=args.patch_size, tile_size=args.image_size
        ),
    )
    clip.ln_pre = Fp32LayerNorm(args.vision_embed_dim, eps=args.vision_norm_eps)
    # HF's hidden_states[k] is taken before post_layernorm.
    clip.ln_post = nn.Identity()
    clip_tail = nn.ModuleDict(
        {
            "layers": nn.ModuleList(layer() for _ in range(args.vision_num_layers - used)),
            "ln_post": Fp32LayerNorm(args.vision_embed_dim, eps=args.vision_norm_eps),
        }
    )
    clip_tail.requires_grad_(False)
    projector = LlavaProjector(args.vision_embed_dim, args.embed_dim)
    return LlavaVisionEncoder(
        clip, clip_tail, projector, keep_cls=args.vision_feature_select_strategy == "full"
    )


def _fuse(
    decoder: nn.Module,
    args: LlavaArgs,
    *,
    decoder_trainable: bool,
    projector_trainable: bool,
    vision_trainable: bool,
) -> LlavaFusionModel:
    encoder = llava_vision_encoder(args)
    # Registered as a fusion module so EarlyFusionModel's `fusion_trainable` switch governs it
    # independently of the frozen vision tower.
    register_fusion_module(encoder.projector)
    model = LlavaFusionModel(
        decoder,
        encoders={"image": encoder},
        encoder_tokens={"image": args.image_token_id},
        decoder_trainable=decoder_trainable,
        encoders_trainable=vision_trainable,
        fusion_trainable=projector_trainable,
    )
    encoder.clip_tail.requires_grad_(False)
    model.llava_args = args  # recipes, checks and the checkpointer read the architecture here
    return model


def _decoder_kwargs(args: LlavaArgs) -> dict:
    return dict(
        vocab_size=args.vocab_size,
        num_layers=args.num_layers,
        num_heads=args.num_heads,
        num_kv_heads=args.num_kv_heads,
        embed_dim=args.embed_dim,
        max_seq_len=args.max_seq_len,
        intermediate_dim=args.intermediate_dim,
        norm_eps=args.norm_eps,
        rope_base=args.rope_base,
    )


def llava_1_5(
    args: LlavaArgs,
    *,
    decoder_trainable: bool = True,
    projector_trainable: bool = True,
    vision_trainable: bool = False,
) -> LlavaFusionModel:
    """LLaVA-1.5 of any size, for full fine-tuning or inference.

    Args:
        args: architecture.
        decoder_trainable: whether the LLM's parameters require grad.
        projector_trainable: whether the projector's parameters require grad.
        vision_trainable: whether the CLIP tower trains (LLaVA-1.5 and POVID keep it frozen).

    Returns:
        EarlyFusionModel with ``model.llava_args`` set.
    """
    return _fuse(
        llama2(**_decoder_kwargs(args)),
        args,
        decoder_trainable=decoder_trainable,
        projector_trainable=projector_trainable,
        vision_trainable=vision_trainable,
    )


def lora_llava_1_5(
    args: LlavaArgs,
    *,
    lora_attn_modules: List[str] = ("q_proj", "k_proj", "v_proj", "output_proj"),
    apply_lora_to_mlp: bool = True,
    apply_lora_to_output: bool = False,
    lora_rank: int = 128,
    lora_alpha: float = 256.0,
    lora_dropout: float = 0.05,
    use_dora: bool = False,
    quantize_base: bool = False,
    projector_trainable: bool = False,
) -> LlavaFusionModel:
    """LLaVA-1.5 with LoRA (or DoRA) on the LLM's linears; QLoRA with ``quantize_base=True``.

    The defaults are POVID's released settings: r=128, alpha=256, dropout 0.05 on every LLM
    linear, projector and vision tower frozen. With ``quantize_base`` the frozen LLM linears are
    stored as torchao NF4 tensors. The LoRA knobs are torchtune's (see ``lora_llama2``).
    """
    decoder = lora_llama2(
        lora_attn_modules=list(lora_attn_modules),
        apply_lora_to_mlp=apply_lora_to_mlp,
        apply_lora_to_output=apply_lora_to_output,
        lora_rank=lora_rank,
        lora_alpha=lora_alpha,
        lora_dropout=lora_dropout,
        use_dora=use_dora,
        quantize_base=quantize_base,
        **{k: v for k, v in _decoder_kwargs(args).items() if k != "rope_base"},
    )
    if args.rope_base != 10000.0:
        # torchtune's lora_llama2 has no rope_base knob: swap in the right RoPE (shared by layers).
        rope = RotaryPositionalEmbeddings(
            args.embed_dim // args.num_heads, args.max_seq_len, base=args.rope_base
        )
        for layer in decoder.layers:
            layer.attn.pos_embeddings = rope
    # The LoRA recipe decides which params train (adapters + optionally the projector);
    # the base decoder starts frozen.
    return _fuse(
        decoder,
        args,
        decoder_trainable=False,
        projector_trainable=projector_trainable,
        vision_trainable=False,
    )


def llava_1_5_7b(**kwargs: Any) -> LlavaFusionModel:
    """LLaVA-1.5-7B (llava-hf layout: vocab 32064, ``<image>`` = 32000); see :func:`llava_1_5`."""
    return llava_1_5(LLAVA_1_5_7B, **kwargs)


def llava_1_5_13b(**kwargs: Any) -> LlavaFusionModel:
    """LLaVA-1.5-13B (llava-hf layout); see :func:`llava_1_5`."""
    return llava_1_5(LLAVA_1_5_13B, **kwargs)


def lora_llava_1_5_7b(**kwargs: Any) -> LlavaFusionModel:
    """LoRA LLaVA-1.5-7B; see :func:`lora_llava_1_5` for the knobs."""
    return lora_llava_1_5(LLAVA_1_5_7B, **kwargs)


def lora_llava_1_5_13b(**kwargs: Any) -> LlavaFusionModel:
    """LoRA LLaVA-1.5-13B; see :func:`lora_llava_1_5` for the knobs."""
    return lora_llava_1_5(LLAVA_1_5_13B, **kwargs)


def qlora_llava_1_5_7b(**kwargs: Any) -> LlavaFusionModel:
    """QLoRA LLaVA-1.5-7B: LoRA over NF4-quantized frozen LLM linears."""
    return lora_llava_1_5(LLAVA_1_5_7B, quantize_base=True, **kwargs)


def qlora_llava_1_5_13b(**kwargs: Any) -> LlavaFusionModel:
    """QLoRA LLaVA-1.5-13B: LoRA over NF4-quantized frozen LLM linears."""
    return lora_llava_1_5(LLAVA_1_5_13B, quantize_base=True, **kwargs)


# ---------------------------------------------------------------------------------------------
# Architecture from a checkpoint directory's config.json
# ---------------------------------------------------------------------------------------------


def _load_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config.json not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def _require(cfg: dict, key: str, path: Path) -> Any:
    if key not in cfg:
        raise ValueError(f"{path}: field {key!r} is missing")
    return cfg[key]


def _text_args(text: dict, path: Path) -> dict:
    num_heads = _require(text, "num_attention_heads", path)
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"{path}: RoPE scaling {rope!r} is not supported (LLaVA-1.5 uses none)")
    return dict(
        vocab_size=_require(text, "vocab_size", path),
        embed_dim=_require(text, "hidden_size", path),
        num_layers=_require(text, "num_hidden_layers", path),
        num_heads=num_heads,
        num_kv_heads=text.get("num_key_value_heads") or num_heads,
        intermediate_dim=_require(text, "intermediate_size", path),
        max_seq_len=text.get("max_position_embeddings", 4096),
        norm_eps=text.get("rms_norm_eps", 1e-5),
        rope_base=float(rope.get("rope_theta", text.get("rope_theta", 10000.0))),
    )


def _vision_args(vision: dict, path: Path) -> dict:
    act = vision.get("hidden_act", "quick_gelu")
    if act != "quick_gelu":
        raise ValueError(f"{path}: vision hidden_act {act!r} is not supported (CLIP uses quick_gelu)")
    return dict(
        vision_embed_dim=_require(vision, "hidden_size", path),
        vision_num_layers=_require(vision, "num_hidden_layers", path),
        vision_num_heads=_require(vision, "num_attention_heads", path),
        vision_intermediate_dim=_require(vision, "intermediate_size", path),
        vision_norm_eps=vision.get("layer_norm_eps", 1e-5),
        image_size=_require(vision, "image_size", path),
        patch_size=_require(vision, "patch_size", path),
    )


# transformers' defaults for fields a llava-hf config.json may leave out (the 7B one does).
_HF_TEXT_DEFAULTS = dict(
    vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
)  # fmt: skip
_HF_VISION_DEFAULTS = dict(
    hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
    image_size=336, patch_size=14, hidden_act="quick_gelu",
)  # fmt: skip


def read_llava_args(checkpoint_dir: str | Path, clip_dir: Optional[str | Path] = None) -> LlavaArgs:
    """Read the architecture from a checkpoint directory's ``config.json``.

    Understands llava-hf configs (``text_config``/``vision_config``; fields the published
    configs leave out take transformers' defaults) and original LLaVA configs
    (``LlavaLlamaForCausalLM``, Llama fields at top level, CLIP read from ``clip_dir`` or the
    directory named by ``mm_vision_tower``).
    """
    checkpoint_dir = Path(checkpoint_dir)
    path = checkpoint_dir / "config.json"
    cfg = _load_json(path)
    # Checked first: the released liuhaotian/llava-v1.5-7b config says model_type "llava" too.
    if "mm_vision_tower" in cfg or "mm_projector_type" in cfg:
        return _read_original_llava_args(cfg, path, clip_dir)
    if "text_config" in cfg or cfg.get("model_type") == "llava":
        text = {**_HF_TEXT_DEFAULTS, **cfg.get("text_config", {})}
        vision = {**_HF_VISION_DEFAULTS, **cfg.get("vision_config", {})}
        feature_layer = cfg.get("vision_feature_layer", -2)
        if not isinstance(feature_layer, int):
            raise ValueError(f"{path}: only a single vision_feature_layer is supported")
        return LlavaArgs(
            **_text_args(text, path),
            **_vision_args(vision, path),
            vision_feature_layer=feature_layer,
            vision_feature_select_strategy=cfg.get("vision_feature_select_strategy", "default"),
            image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 32000)),
            pad_token_id=cfg.get("pad_token_id", text.get("pad_token_id")) or 0,
            source_format="hf",
        )
    raise ValueError(
        f"{path}: not a LLaVA config (expected llava-hf `text_config`/`vision_config` or "
        f"original LLaVA `mm_vision_tower`)"
    )


def _read_original_llava_args(cfg: dict, path: Path, clip_dir: Optional[str | Path]) -> LlavaArgs:
    projector = cfg.get("mm_projector_type", "linear")
    if projector != "mlp2x_gelu":
        raise ValueError(f"{path}: mm_projector_type {projector!r} is not LLaVA-1.5's mlp2x_gelu")
    tower = clip_dir or cfg.get("mm_vision_tower")
    clip_cfg_path = Path(str(tower)) / "config.json"
    if not clip_cfg_path.exists():
        raise FileNotFoundError(
            f"{path}: original-LLaVA checkpoints carry no vision tower; mm_vision_tower="
            f"{cfg.get('mm_vision_tower')!r} is not a local directory with a config.json. Pass "
            f"clip_dir= pointing at a local copy of openai/clip-vit-large-patch14-336."
        )
    clip_cfg = _load_json(clip_cfg_path)
    vision = clip_cfg.get("vision_config", clip_cfg)  # full CLIPModel config or CLIPVisionModel
    select = cfg.get("mm_vision_select_feature", "patch")
    text = _text_args(cfg, path)
    return LlavaArgs(
        **text,
        **_vision_args({**_HF_VISION_DEFAULTS, **vision}, clip_cfg_path),
        vision_feature_layer=cfg.get("mm_vision_select_layer", -2),
        vision_feature_select_strategy="default" if select == "patch" else "full",
        # The original splices images at id -200; inside the model any id outside the text
        # vocabulary works, and the first one past it is what llava-hf later adopted.
        image_token_id=text["vocab_size"],
        pad_token_id=0,
        source_format="original",
        extra={"clip_dir": str(Path(str(tower)))},
    )


def llava_from_checkpoint(
    checkpoint_dir: str | Path, clip_dir: Optional[str | Path] = None, **kwargs: Any
) -> LlavaFusionModel:
    """Full LLaVA whose architecture is read from ``checkpoint_dir/config.json``."""
    return llava_1_5(read_llava_args(checkpoint_dir, clip_dir), **kwargs)


def lora_llava_from_checkpoint(
    checkpoint_dir: str | Path, clip_dir: Optional[str | Path] = None, **kwargs: Any
) -> LlavaFusionModel:
    """LoRA/QLoRA/DoRA LLaVA whose architecture is read from ``checkpoint_dir/config.json``."""
    return lora_llava_1_5(read_llava_args(checkpoint_dir, clip_dir), **kwargs)
