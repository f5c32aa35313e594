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

__all__ = [
    "LlavaAnswerer",
    "OpenAIAnswerer",
    "openai_messages",
    "question_turns",
    "read_answer_requests",
    "answer_requests",
    "answer_requests_file",
]

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


# --------------------------------------------------------------- the same, from a server


def openai_messages(turns: Messages, image_url: str) -> List[dict]:
    """LLaVA turns (``from``/``value`` or ``role``/``content``, one ``<image>`` marker) as
    OpenAI chat messages: the image part first in the first user message, the marker removed.
    No system message: the server's chat template supplies the model's own (see README)."""
    messages, seen_image = [], False
    for turn in turns:
        speaker = turn.get("from", turn.get("role"))
        text = str(turn.get("value", turn.get("content", "")))
        role = "user" if speaker in ("human", "user") else "assistant"
        if role == "user" and not seen_image:
            seen_image = True
            content: Any = [
                {"type": "image_url", "image_url": {"url": image_url}},
                {"type": "text", "text": text.replace(IMAGE_TOKEN, "").strip()},
            ]
        else:
            content = text.replace(IMAGE_TOKEN, "").strip()
        messages.append({"role": role, "content": content})
    return messages


class OpenAIAnswerer:
    """Answers one-image conversations through an OpenAI-compatible server (vLLM, SGLang, ...),
    the ``backend: openai`` of ``povid_generate``, ``povid_distort`` and ``povid_eval``.

    Args:
        chat: the run's :class:`povid_data.openai_client.ChatClient`.
        model: the served model's name.
        request_params: decoding fields of the request (``max_tokens``, ``temperature``,
            ``top_p``, ``seed``, ``extra_body``).
        refusal: a predicate for answers that are refusals (retried, then rejected).
    """

    def __init__(self, chat: Any, *, model: str, request_params: Mapping[str, Any], refusal: Any = None) -> None:
        self.chat = chat
        self.model = model
        self.request_params = dict(request_params)
        self.refusal = refusal

    @staticmethod
    def request_params_from_config(cfg: Any, *, greedy: bool = False) -> dict:
        """The decoding keys of a generating recipe's config as request fields: ``max_tokens``
        from ``max_new_tokens``; temperature 0 (greedy) unless sampling; ``top_p``; ``seed``
        when ``client.send_seed``; ``client.extra_body`` (e.g. vLLM's ``top_k``). A config
        ``top_k`` goes into ``extra_body`` (OpenAI's API has no such field; vLLM takes it)."""
        from omegaconf import OmegaConf

        client = cfg.client
        params: dict = {"max_tokens": int(cfg.max_new_tokens)}
        params["temperature"] = 0.0 if greedy else float(cfg.temperature)
        if not greedy and cfg.top_p is not None and float(cfg.top_p) < 1.0:
            params["top_p"] = float(cfg.top_p)
        if client.get("send_seed", True) and cfg.get("seed") is not None:
            params["seed"] = int(cfg.seed)
        extra = OmegaConf.to_container(client.extra_body, resolve=True) if client.get("extra_body") else {}
        if not greedy and cfg.get("top_k") is not None:
            extra = {"top_k": int(cfg.top_k), **extra}
        if extra:
            params["extra_body"] = extra
        return params

    def request(self, turns: Messages, image: PIL.Image.Image) -> dict:
        """The keyword arguments of ``chat.completions.create`` for one conversation; the image
        is sent as PNG (lossless: the server sees exactly these pixels)."""
        from povid_data.openai_client import image_data_url

        return {"model": self.model, "messages": openai_messages(turns, image_data_url(image)), **self.request_params}

    def judge(self, response: Any) -> tuple:
        """(reason the reply is unusable or None, its text). A reply cut at ``max_tokens`` is
        an answer, as the local backend's is at ``max_new_tokens``."""
        if not response.choices:
            return "empty", None
        choice = response.choices[0]
        text = (choice.message.content or "").strip()
        if choice.finish_reason == "content_filter":
            return "content_filter", text
        if not text:
            return "empty", text
        if self.refusal is not None and self.refusal(text):
            return "refusal", text
        return None, text

    async def answer(self, turns: Messages, image: PIL.Image.Image) -> Any:
        """The outcome (:class:`povid_data.hallucinate.Outcome`) of one conversation."""
        return await self.chat.complete(self.request(turns, image), self.judge)


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


def answer_records_via_server(
    cfg: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    output_file: str | Path,
    rejects_file: str | Path,
    prepare: Any,
    make_output: Any,
    desc: str,
    greedy: bool = False,
) -> Any:
    """Answer ``records`` through the server of ``cfg`` (``backend: openai``), concurrently,
    into ``output_file`` and ``rejects_file``, resumable by id (see
    :class:`povid_data.record_run.RecordRun`).

    Args:
        cfg: the recipe config (``client``, ``retry``, ``concurrency``, ``max_requests``,
            ``flush_every``, ``flush_seconds``, decoding keys).
        records: the requests, each with an ``id``.
        output_file, rejects_file: where answers and records that failed for good go.
        prepare: ``record -> (turns, PIL image)``: what to ask about which image.
        make_output: ``(record, answer, meta) -> output line``; ``meta`` holds ``backend``,
            ``model`` (as the server named it) and ``base_url``.
        desc: the progress bar's label.
        greedy: decode greedily whatever the config says (an evaluation protocol).

    Returns:
        The run's :class:`povid_data.record_run.RunSummary` (printed too).
    """
    from povid_data.hallucinate import DEFAULT_REFUSAL_PATTERNS, ValidationRules
    from povid_data.openai_client import chat_client_from_config
    from povid_data.record_run import RecordRun

    chat = chat_client_from_config(cfg)
    patterns = cfg.get("refusal_patterns")
    rules = ValidationRules(refusal_patterns=list(patterns if patterns is not None else DEFAULT_REFUSAL_PATTERNS))
    answerer = OpenAIAnswerer(
        chat, model=cfg.client.model, request_params=OpenAIAnswerer.request_params_from_config(cfg, greedy=greedy),
        refusal=rules.is_refusal if cfg.get("reject_refusals", True) else None,
    )  # fmt: skip

    def meta(outcome: Any) -> dict:
        return {"backend": "openai", "model": outcome.meta.get("model", cfg.client.model),
                "base_url": cfg.client.base_url}  # fmt: skip

    run = RecordRun(
        output_file, rejects_file,
        make_output=lambda record, outcome: make_output(record, outcome.text, meta(outcome)),
        make_reject=lambda record, outcome: {"id": record["id"], "reason": outcome.reason, "detail": outcome.detail,
                                             "attempts": outcome.attempts, **meta(outcome)},
        desc=desc, flush_every=cfg.get("flush_every", 32), flush_seconds=cfg.get("flush_seconds", 10.0),
    )  # fmt: skip
    try:
        todo = run.pending(records)

        async def handle(record: Mapping[str, Any]) -> Any:
            turns, image = prepare(record)
            return await answerer.answer(turns, image)

        summary = run.run_concurrent(todo, handle, concurrency=cfg.get("concurrency", 8), close=chat.close)
    finally:
        run.close()
    print("\n".join(summary.lines(desc, output_file, rejects_file)))
    return summary
