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

__all__ = ["LlavaAnswerer", "question_turns", "read_answer_requests", "answer_requests", "answer_requests_file"]

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
    def from_config(cls, cfg: Any, *, greedy: bool = False) -> "LlavaAnswerer":
        """Load from a generating recipe's config: the ``model`` block (instantiated with the
        config's ``device`` and ``dtype``, then weight-only ``quantization``), the ``tokenizer``
        block, ``image_mode`` and the decoding keys ``max_new_tokens``, ``temperature``,
        ``top_p``, ``top_k``, ``seed`` (which seeds sampling only). ``greedy``: decode greedily
        whatever the config says (an evaluation protocol), and read no sampling keys."""
        from torchtune import config, training, utils

        log = utils.get_logger("INFO")
        device = utils.get_device(cfg.device)
        dtype = training.get_dtype(cfg.dtype, device=device)
        if greedy:
            params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, top_p=1.0, top_k=None)
        else:
            params = SamplingParams(
                max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k
            )
        start = time.perf_counter()
        model = quantize_for_inference(config.instantiate(cfg.model, device=device, dtype=dtype), cfg.get("quantization"))
        answerer = cls(
            model,
            config.instantiate(cfg.tokenizer),
            params=params,
            image_mode=cfg.image_mode,
            generator=torch.Generator(device=device).manual_seed(cfg.seed),
        )
        n_params = sum(p.numel() for p in model.parameters())
        log.info(
            f"Loaded {cfg.model.get('checkpoint_dir', cfg.model._component_)} ({n_params / 1e6:.1f} M parameters, "
            f"{dtype}, {device}) in {time.perf_counter() - start:.1f} s"
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


# --------------------------------------------------------------- a file of answer requests


def read_answer_requests(
    data_file: str | Path, image_dir: Optional[str | Path] = None, default_prompt: Optional[str] = None
) -> List[dict]:
    """The records of ``data_file`` (``id``, ``image``, optional ``prompt``) as requests
    ``{"id", "image" (path resolved against ``image_dir``, default the file's folder),
    "image_ref" (as written), "prompt"}``.

    Raises:
        ValueError: a missing field or an id that appears twice, naming file, record and field.
    """
    from povid_data.jsonl import read_records, require_field

    base = Path(image_dir) if image_dir else Path(data_file).parent
    requests, seen = [], set()
    for raw in read_records(data_file):
        rid = str(require_field(raw, "id", data_file, kind=(str, int)))
        if rid in seen:
            raise ValueError(f"{data_file}: record id={rid!r} appears twice")
        seen.add(rid)
        image_ref = require_field(raw, "image", data_file)
        prompt = raw.get("prompt") or default_prompt
        requests.append({"id": raw["id"], "image": str(base / image_ref), "image_ref": image_ref, "prompt": prompt})
    return requests


def answer_requests(answerer: LlavaAnswerer, batch: Sequence[Mapping[str, Any]], source: str) -> List[str]:
    """Answers to requests with ``image`` (a path) and ``prompt``; errors name ``source`` and the id."""
    from povid_data.transforms import load_image

    wheres = [f"{source}: record id={record['id']!r}" for record in batch]
    images = []
    for record, where in zip(batch, wheres):
        try:
            images.append(load_image(record["image"]))
        except (FileNotFoundError, ValueError) as e:
            raise type(e)(f"{where}: field 'image': {e}") from None
    return answerer.answer([question_turns(r["prompt"]) for r in batch], images, wheres)


def answer_requests_file(
    answerer: LlavaAnswerer, requests: Sequence[Mapping[str, Any]], output_file: str | Path, *,
    batch_size: int, source: str,
) -> Path:  # fmt: skip
    """Answer ``requests`` (:func:`read_answer_requests`) in batches, appending ``{"id", "image",
    "prompt", "response"}`` lines to ``output_file`` as they come; ids already there are skipped,
    so a crashed run resumes where it stopped. Returns ``output_file``."""
    from torchtune import utils
    from tqdm import tqdm

    from povid_data.jsonl import ResumableJsonlWriter

    log = utils.get_logger("INFO")
    out_path = Path(output_file)
    with ResumableJsonlWriter(out_path) as writer:
        todo = list(writer.pending(requests))
        if len(todo) < len(requests):
            log.info(f"Resuming: {len(requests) - len(todo)} of {len(requests)} already in {out_path}")
        with tqdm(total=len(requests), initial=len(requests) - len(todo), desc="generate") as bar:
            for i in range(0, len(todo), batch_size):
                batch = todo[i : i + batch_size]
                responses = answer_requests(answerer, batch, source)
                writer.write(
                    {"id": r["id"], "image": r["image_ref"], "prompt": r["prompt"], "response": text}
                    for r, text in zip(batch, responses)
                )
                bar.update(len(batch))
    log.info(f"Wrote {out_path}")
    return out_path
