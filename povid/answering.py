"""Answer images with a loaded LLaVA checkpoint: the batch step every generating recipe shares.

:class:`LlavaAnswerer` holds the model, its tokenizer, the vicuna_v1 prompt transform and the
image transform, and turns a batch of (conversation, PIL image) pairs into answers with
:func:`povid.generation.generate`. Recipes decide where images come from (a file, a noised copy,
...) and where answers go; the tokenizing, preprocessing and batched decoding live here once.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, List, Mapping, Optional, Sequence

import PIL.Image
import torch
from torch import nn

from povid.checkpoint import load_llava
from povid.generation import SamplingParams, generate, quantize_for_inference
from povid_data.tokenizer import LlavaTokenizer
from povid_data.transforms import IMAGE_TOKEN, LlavaImageTransform, LlavaMessageTransform

__all__ = ["LlavaAnswerer", "question_turns"]

Messages = Sequence[Mapping[str, Any]]



def question_turns(question: str) -> List[dict]:
    """A one-turn conversation asking ``question`` about one image (``<image>\\n`` first)."""
    return [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}]


class LlavaAnswerer:
    """A LLaVA model ready to answer batches of one-image conversations.

    Args:
        model: a LLaVA ``EarlyFusionModel`` with ``llava_args`` (as :func:`load_llava` returns).
        tokenizer: the checkpoint's tokenizer.
        params: decoding settings (greedy when ``temperature == 0``).
        image_mode: ``pad`` (original LLaVA-1.5 / POVID) or ``crop`` (llava-hf's processor).
        generator: random generator for sampling; unused by greedy decoding.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: LlavaTokenizer,
        *,
        params: SamplingParams,
        image_mode: str = "pad",
        generator: Optional[torch.Generator] = None,
    ) -> None:
        args = model.llava_args
        self.model = model
        self.tokenizer = tokenizer
        self.params = params
        self.generator = generator
        self.messages = LlavaMessageTransform(
            tokenizer,
            image_token_id=args.image_token_id,
            num_image_tokens=args.num_image_tokens,
            # Room for the answer: a prompt that leaves none is an error, not a silent cut.
            max_seq_len=args.max_seq_len - params.max_new_tokens,
        )
        self.images = LlavaImageTransform(image_mode, size=args.image_size)

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint_dir: str | Path,
        *,
        params: SamplingParams,
        clip_dir: Optional[str | Path] = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        quantization: Optional[str] = None,
        image_mode: str = "pad",
        generator: Optional[torch.Generator] = None,
    ) -> "LlavaAnswerer":
        """Load any supported checkpoint layout (optionally weight-only quantized)."""
        model = load_llava(checkpoint_dir, clip_dir=clip_dir, device=device, dtype=dtype)
        model = quantize_for_inference(model, quantization)
        tokenizer = LlavaTokenizer.from_dir(checkpoint_dir)
        return cls(model, tokenizer, params=params, image_mode=image_mode, generator=generator)

    @classmethod
    def from_config(cls, cfg: Any) -> "LlavaAnswerer":
        """Load from a generating recipe's config: ``checkpoint_dir``, ``clip_dir``, ``device``,
        ``dtype``, ``quantization``, ``image_mode`` and the decoding keys ``max_new_tokens``,
        ``temperature``, ``top_p``, ``top_k``, ``seed`` (which seeds sampling only)."""
        from torchtune import training, utils

        log = utils.get_logger("INFO")
        device = utils.get_device(cfg.device)
        dtype = training.get_dtype(cfg.dtype, device=device)
        params = SamplingParams(
            max_new_tokens=cfg.max_new_tokens,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
        )
        start = time.perf_counter()
        answerer = cls.from_checkpoint(
            cfg.checkpoint_dir,
            params=params,
            clip_dir=cfg.clip_dir,
            device=device,
            dtype=dtype,
            quantization=cfg.quantization,
            image_mode=cfg.image_mode,
            generator=torch.Generator(device=device).manual_seed(cfg.seed),
        )
        n_params = sum(p.numel() for p in answerer.model.parameters())
        log.info(
            f"Loaded {cfg.checkpoint_dir} ({n_params / 1e6:.1f} M parameters, {dtype}, {device}) "
            f"in {time.perf_counter() - start:.1f} s"
        )
        return answerer

    def answer(
        self,
        conversations: Sequence[Messages],
        images: Sequence[PIL.Image.Image],
        sources: Sequence[str],
    ) -> List[str]:
        """Answers to the last user turn of each conversation, one image each, in one batch.

        Args:
            conversations: LLaVA (``from``/``value``) turns ending with the user's, holding
                exactly one ``<image>`` marker.
            images: one PIL image per conversation (preprocessed here with ``image_mode``).
            sources: per conversation, what errors name (e.g. ``"file: record id='7'"``).

        Returns:
            The decoded answers, stripped.
        """
        if not len(conversations) == len(images) == len(sources):
            raise ValueError(
                f"{len(conversations)} conversations, {len(images)} images and {len(sources)} "
                "sources: need one of each per row"
            )
        prompts = [
            self.messages.tokenize(turns, add_generation_prompt=True, source=where, num_images=1)[0]
            for turns, where in zip(conversations, sources)
        ]
        pixels = torch.stack([self.images(image) for image in images]) if images else None
        outputs = generate(
            self.model,
            prompts,
            pixels,
            params=self.params,
            eos_id=self.tokenizer.eos_id,
            pad_id=self.model.llava_args.pad_token_id,
            image_token_id=self.model.llava_args.image_token_id,
            generator=self.generator,
        )
        return [self.tokenizer.decode(ids).strip() for ids in outputs]
