"""Hallucination injection by an AI model behind any OpenAI-compatible chat endpoint.

Backend ``openai`` of recipe ``povid_hallucinate``: the ground-truth answer (and the image, as a
data URL, when the model takes images) goes to a chat model with a prompt asking for a rewrite
with plausible hallucinations; the reply is checked (:func:`povid_data.hallucinate.check_rewrite`)
and, if unusable, asked for again.

Retries are ours, not the ``openai`` client's (it is built with ``max_retries=0``): every request,
first or retried, must count against the run's request budget, a ``Retry-After`` must pause
all workers rather than one (a rate limit is per account, not per request), and failed
validations must share the attempt limit with HTTP failures. What happens on each failure:

=====================================  ==========================================================
429 with ``Retry-After`` (or ``-ms``)  wait at least that long (all workers), then retry
429 ``insufficient_quota``             stop the run (record stays pending)
429 / connection error, attempts out   stop the run (the endpoint, not the record, is failing)
5xx, 408, 409, timeout                 exponential backoff with jitter, retry; attempts out:
                                       reject the record
401, 403, 404                          :class:`FatalAPIError` (wrong key, model or URL)
other 4xx                              reject the record (the request itself is bad); before
                                       any success: :class:`FatalAPIError` (likely the config)
unusable answer (refusal, empty, ...)  retry; attempts out: reject with the last reason
budget spent                           stop the run (record stays pending)
=====================================  ==========================================================
"""

from __future__ import annotations

import asyncio
import base64
import email.utils
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

import openai

from povid_data.hallucinate import Outcome, Usage, ValidationRules, check_rewrite, clean_rewrite

__all__ = [
    "DESCRIPTION_KINDS",
    "REASONING_KINDS",
    "PromptTemplates",
    "RetryPolicy",
    "RequestBudget",
    "FatalAPIError",
    "looks_like_reasoning",
    "image_data_url",
    "retry_after_seconds",
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


_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
]


def image_data_url(path: str | Path) -> str:
    """``data:image/...;base64,...`` for an image file (type read from its first bytes)."""
    data = Path(path).read_bytes()
    mime = next((m for magic, m in _MAGIC if data.startswith(magic)), None)
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None:
        raise ValueError(f"{path}: not a PNG, JPEG, GIF or WebP image")
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def retry_after_seconds(headers: Optional[Mapping[str, str]]) -> Optional[float]:
    """Seconds a response asks us to wait: ``retry-after-ms``, else ``Retry-After`` (seconds
    or an HTTP date); None if neither is there or parses."""
    if not headers:
        return None
    value = headers.get("retry-after-ms")
    if value is not None:
        try:
            return max(0.0, float(value) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass
class RetryPolicy:
    """Attempts per record and how long to wait between them.

    Backoff before attempt ``k + 1`` is ``d / 2 + uniform(0, d / 2)`` with
    ``d = min(backoff_max, backoff_base * 2 ** (k - 1))`` (exponential, with jitter so that
    workers that failed together do not retry together). A ``Retry-After`` above
    ``max_retry_after`` seconds (a quota reset hours away) stops the run instead of waiting.
    """

    max_attempts: int = 5
    backoff_base: float = 1.0
    backoff_max: float = 60.0
    max_retry_after: float = 300.0

    def backoff(self, attempt: int, rng: random.Random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        d = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return d / 2 + rng.uniform(0, d / 2)


class RequestBudget:
    """At most ``limit`` requests for the run (None: no limit); retries count."""

    def __init__(self, limit: Optional[int]) -> None:
        self.limit = limit
        self.used = 0

    def take(self) -> bool:
        """Spend one request; False if none is left."""
        if self.limit is not None and self.used >= self.limit:
            return False
        self.used += 1
        return True


class FatalAPIError(RuntimeError):
    """The endpoint refuses every request (bad key, unknown model, wrong URL)."""


class OpenAIHallucinator:
    """Asks a chat model for hallucinated rewrites, with retries, validation and a budget.

    Args:
        client: an ``openai.AsyncOpenAI`` built with ``max_retries=0``.
        model: the model name sent with each request.
        prompts: the prompt templates.
        validation: what a usable rewrite looks like.
        retry: attempts and backoff.
        budget: the run's request budget (shared by all records).
        send_image: send the image as a data URL (for models that take images).
        image_detail: the ``detail`` of the image part (``auto``, ``low``, ``high``); None: omit.
        request_params: extra keyword arguments of ``chat.completions.create`` (``max_tokens``,
            ``temperature``, ``seed``, ``extra_body`` ...).
        rng: jitter source.
    """

    def __init__(
        self,
        client: Any,
        *,
        model: str,
        prompts: PromptTemplates,
        validation: ValidationRules,
        retry: RetryPolicy,
        budget: RequestBudget,
        send_image: bool = True,
        image_detail: Optional[str] = "auto",
        request_params: Optional[Dict[str, Any]] = None,
        rng: Optional[random.Random] = None,
    ) -> None:
        self.client = client
        self.model = model
        self.prompts = prompts
        self.validation = validation
        self.retry = retry
        self.budget = budget
        self.send_image = send_image
        self.image_detail = image_detail
        self.request_params = dict(request_params or {})
        self.rng = rng or random.Random()
        self.stop_reason: Optional[str] = None  # set when the run should end early
        self.answered = 0  # responses received (any content)
        self._paused_until = 0.0  # monotonic time before which no worker sends

    # ---- requests ---------------------------------------------------------------------------

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
        request = self.request(question, answer, image)
        usage = Usage()
        reason, detail = "no_attempt", ""
        meta: Dict[str, Any] = {
            "model": self.model,
            "kinds": None,  # the model does not say which it injected
            "kinds_requested": REASONING_KINDS if style == "reasoning" else DESCRIPTION_KINDS,
            "prompt": style,
        }
        for attempt in range(1, self.retry.max_attempts + 1):
            if self.stop_reason:
                return Outcome("stopped", reason=self.stop_reason, attempts=attempt - 1, usage=usage)
            await self._wait_while_paused()
            if not self.budget.take():
                self.stop_reason = f"request budget of {self.budget.limit} spent"
                return Outcome("stopped", reason=self.stop_reason, attempts=attempt - 1, usage=usage)
            usage.requests += 1
            delay = self.retry.backoff(attempt, self.rng)
            try:
                response = await self.client.chat.completions.create(**request)
            except openai.APITimeoutError:
                reason, detail = "timeout", "no answer within the client timeout"
            except openai.APIConnectionError as err:
                reason, detail = "connection_error", str(err)
            except openai.APIStatusError as err:
                status = err.status_code
                reason, detail = f"http_{status}", _error_message(err)
                if status in (401, 403, 404):
                    raise FatalAPIError(
                        f"{status} from the endpoint (check client.base_url, client.model and the "
                        f"key in client.api_key_env): {detail}"
                    ) from None
                if status == 429 and getattr(err, "code", None) == "insufficient_quota":
                    self.stop_reason = f"quota exhausted ({detail})"
                    return Outcome("stopped", reason=self.stop_reason, attempts=attempt, usage=usage)
                if status != 429 and status < 500 and status not in (408, 409):
                    if not self.answered:
                        # Before any success, a refused request is most likely the config (a
                        # parameter this server rejects), not the record: stop rather than
                        # reject every record.
                        raise FatalAPIError(
                            f"{status} from the endpoint before any success (check client.* and "
                            f"prompts.*): {detail}"
                        ) from None
                    # A request this server will never accept (e.g. an image it cannot read).
                    return Outcome("rejected", reason=reason, detail=detail, attempts=attempt, usage=usage, meta=meta)
                wait = retry_after_seconds(err.response.headers)
                if wait is not None:
                    if wait > self.retry.max_retry_after:
                        self.stop_reason = (
                            f"the endpoint asks to wait {wait:.0f} s (> retry.max_retry_after); rerun later"
                        )
                        return Outcome("stopped", reason=self.stop_reason, attempts=attempt, usage=usage)
                    # At least what the server asked, plus a little jitter; all workers wait.
                    delay = wait * (1 + 0.1 * self.rng.random())
                    self._pause(delay)
            except openai.APIError as err:
                # E.g. a 200 whose body is not a chat completion (a proxy's error page).
                reason, detail = "bad_response", str(err)[:300]
            else:
                self.answered += 1
                usage.prompt_tokens += getattr(response.usage, "prompt_tokens", 0) or 0
                usage.completion_tokens += getattr(response.usage, "completion_tokens", 0) or 0
                meta["model"] = getattr(response, "model", None) or self.model
                reason, text = self._judge(answer, response)
                if reason is None:
                    return Outcome("ok", text=text, attempts=attempt, usage=usage, meta=meta)
                detail = (text or "")[:300]
                delay = 0.0  # a bad answer is not the server being overloaded: ask again now
            if attempt < self.retry.max_attempts:
                await asyncio.sleep(delay)
        if reason in ("http_429", "connection_error"):
            # Not this record's fault: the endpoint is failing. Leave the record pending.
            self.stop_reason = f"{reason} after {self.retry.max_attempts} attempts ({detail})"
            return Outcome("stopped", reason=self.stop_reason, attempts=self.retry.max_attempts, usage=usage)
        return Outcome(
            "rejected", reason=reason, detail=detail, attempts=self.retry.max_attempts, usage=usage, meta=meta
        )

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

    # ---- shared pause on rate limits --------------------------------------------------------

    def _pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def _wait_while_paused(self) -> None:
        while (remaining := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(remaining)


def _error_message(err: Any) -> str:
    """The server's error message, falling back to the exception text."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
    return str(err)[:300]
