"""Hallucination injection by an AI model behind any OpenAI-compatible chat endpoint.

Backend ``openai`` of recipe ``povid_hallucinate``: the ground-truth answer (and the image, as a
data URL, when the model takes images) goes to a chat model with a prompt asking for a rewrite
with plausible hallucinations; the reply is checked (:func:`povid_data.hallucinate.check_rewrite`)
and, if unusable, asked for again.

Requests go through :class:`povid_data.openai_client.ChatClient` (retries, backoff,
``Retry-After``, the request budget, fatal errors: see its module for what happens on each
failure); this module builds the request and judges the reply.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional

from povid_data.hallucinate import Outcome, ValidationRules, check_rewrite, clean_rewrite
from povid_data.openai_client import ChatClient, image_data_url

__all__ = [
    "DESCRIPTION_KINDS",
    "REASONING_KINDS",
    "PromptTemplates",
    "looks_like_reasoning",
    "OpenAIHallucinator",
]

# What the prompts ask the model to inject (the model does not report what it did).
DESCRIPTION_KINDS = ["object_cooccurrence", "relation", "attribute"]
REASONING_KINDS = DESCRIPTION_KINDS + ["reasoning"]


@dataclass
class PromptTemplates:
    """The prompt, as config values. ``{question}`` and ``{answer}`` are filled in.

    ``reasoning`` is used for answers that explain or infer (see :func:`looks_like_reasoning`)
    when ``reasoning_detection`` is ``auto``; ``always``/``never`` force the choice.
    """

    system: str
    description: str
    reasoning: str
    reasoning_detection: str = "auto"

    def __post_init__(self) -> None:
        if self.reasoning_detection not in ("auto", "always", "never"):
            raise ValueError(
                f"prompts.reasoning_detection must be auto, always or never, got {self.reasoning_detection!r}"
            )

    def style(self, question: str, answer: str) -> str:
        """``"reasoning"`` or ``"description"``: which user template this record gets."""
        if self.reasoning_detection == "always":
            return "reasoning"
        if self.reasoning_detection == "never":
            return "description"
        return "reasoning" if looks_like_reasoning(question, answer) else "description"

    def user_text(self, style: str, question: str, answer: str) -> str:
        """The user message text for a record."""
        template = self.reasoning if style == "reasoning" else self.description
        return template.format(question=question, answer=answer)


_REASONING_QUESTION = re.compile(
    r"^\s*(why\b|how (?:might|could|can|would|does|do|did|is|are)\b|"
    r"what (?:might|could|may|can|would|should)\b|"
    r"what (?:is|are) (?:the )?(?:possible |likely |potential )?(?:reasons?|purpose|significance|benefits?|challenges?)\b|"
    r"what (?:does|do|can) .{0,80}\b(?:suggest|indicate|imply|infer)\b)",
    re.IGNORECASE,
)
_REASONING_MARKERS = re.compile(
    r"\b(because|therefore|thus|hence|suggests?|indicates?|implies|likely|probably|possibly)\b",
    re.IGNORECASE,
)


def looks_like_reasoning(question: str, answer: str) -> bool:
    """Whether a question/answer pair is a reasoning one (LLaVA-Instruct's "complex reasoning"):
    the question asks why/what might, or the answer argues (two or more reasoning markers)."""
    return bool(_REASONING_QUESTION.search(question)) or len(_REASONING_MARKERS.findall(answer)) >= 2


class OpenAIHallucinator:
    """Asks a chat model for hallucinated rewrites and judges them.

    Args:
        chat: the run's :class:`ChatClient` (retries, budget, rate limits); None builds
            requests only (a dry run).
        model: the model name sent with each request.
        prompts: the prompt templates.
        validation: what a usable rewrite looks like.
        send_image: send the image as a data URL (for models that take images).
        image_detail: the ``detail`` of the image part (``auto``, ``low``, ``high``); None: omit.
        request_params: extra keyword arguments of ``chat.completions.create`` (``max_tokens``,
            ``temperature``, ``seed``, ``extra_body`` ...).
    """

    def __init__(
        self,
        chat: Optional[ChatClient],
        *,
        model: str,
        prompts: PromptTemplates,
        validation: ValidationRules,
        send_image: bool = True,
        image_detail: Optional[str] = "auto",
        request_params: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.chat = chat
        self.model = model
        self.prompts = prompts
        self.validation = validation
        self.send_image = send_image
        self.image_detail = image_detail
        self.request_params = dict(request_params or {})

    def request(self, question: str, answer: str, image: Optional[Path]) -> Dict[str, Any]:
        """The keyword arguments of ``chat.completions.create`` for one record."""
        style = self.prompts.style(question, answer)
        text = self.prompts.user_text(style, question, answer)
        if self.send_image and image is not None:
            image_part: Dict[str, Any] = {"url": image_data_url(image)}
            if self.image_detail:
                image_part["detail"] = self.image_detail
            content: Any = [{"type": "text", "text": text}, {"type": "image_url", "image_url": image_part}]
        else:
            content = text
        messages: List[Dict[str, Any]] = []
        if self.prompts.system:
            messages.append({"role": "system", "content": self.prompts.system})
        messages.append({"role": "user", "content": content})
        return {"model": self.model, "messages": messages, **self.request_params}

    async def rewrite(self, question: str, answer: str, image: Optional[Path]) -> Outcome:
        """A validated hallucinated rewrite of ``answer``, or why there is none."""
        style = self.prompts.style(question, answer)
        meta: Dict[str, Any] = {
            "model": self.model,
            "kinds": None,  # the model does not say which it injected
            "kinds_requested": REASONING_KINDS if style == "reasoning" else DESCRIPTION_KINDS,
            "prompt": style,
        }
        return await self.chat.complete(self.request(question, answer, image), lambda r: self._judge(answer, r), meta)

    def _judge(self, answer: str, response: Any) -> tuple[Optional[str], Optional[str]]:
        """(reason the reply is unusable or None, the cleaned reply)."""
        if not response.choices:
            return "empty", None
        choice = response.choices[0]
        text = clean_rewrite(choice.message.content)
        if choice.finish_reason == "length":
            return "truncated", text
        if choice.finish_reason == "content_filter":
            return "content_filter", text
        return check_rewrite(answer, text, self.validation), text
