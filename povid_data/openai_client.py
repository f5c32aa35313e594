"""One client for every recipe that talks to an OpenAI-compatible chat endpoint.

Stage 1 (``povid_hallucinate``, backend ``openai``) and the ``openai`` backend of the answering
recipes (``povid_generate``, ``povid_distort``, ``povid_eval``) send their requests through
:class:`ChatClient`: a request is built by the caller, the reply judged by the caller, and
everything between (retries, backoff, ``Retry-After``, the request budget, fatal errors) is
decided here once.

Retries are ours, not the ``openai`` client's (it is built with ``max_retries=0``): every request,
first or retried, must count against the run's request budget, a ``Retry-After`` must pause
all workers rather than one (a rate limit is per account, not per request), and unusable
answers must share the attempt limit with HTTP failures. What happens on each failure:

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
import io
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import openai
import PIL.Image

from povid_data.hallucinate import Outcome, Usage

__all__ = [
    "ChatClient",
    "FatalAPIError",
    "Judge",
    "RequestBudget",
    "RetryPolicy",
    "api_key_from_env",
    "async_openai_client",
    "chat_client_from_config",
    "image_data_url",
    "png_bytes",
    "retry_after_seconds",
]

# (reason the reply is unusable or None, the reply's text): the caller's verdict on a response.
Judge = Callable[[Any], Tuple[Optional[str], Optional[str]]]

_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
]


def png_bytes(image: PIL.Image.Image) -> bytes:
    """The image as PNG (lossless: the server decodes exactly these pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def image_data_url(image: str | Path | PIL.Image.Image) -> str:
    """``data:image/...;base64,...`` for an image file (type read from its first bytes, the
    bytes sent as they are) or an in-memory image (sent as PNG)."""
    if isinstance(image, PIL.Image.Image):
        data = png_bytes(image)
    else:
        data = Path(image).read_bytes()
    mime = next((m for magic, m in _MAGIC if data.startswith(magic)), None)
    if mime is None and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        mime = "image/webp"
    if mime is None:
        raise ValueError(f"{image}: not a PNG, JPEG, GIF or WebP image")
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


def api_key_from_env(variable: Optional[str], *, required: bool = True) -> str:
    """The API key held by environment variable ``variable`` (config ``client.api_key_env``);
    ``"EMPTY"`` when ``variable`` is None (a server without authentication, such as a local
    vLLM, accepts anything).

    Raises:
        ValueError: the variable is unset or empty and ``required``.
    """
    if not variable:
        return "EMPTY"
    key = os.environ.get(variable, "")
    if not key and required:
        raise ValueError(
            f"client.api_key_env: environment variable {variable} is not set "
            "(set it, or client.api_key_env=null for a server without authentication)"
        )
    return key


def async_openai_client(base_url: Optional[str], api_key: str, timeout: float) -> Any:
    """An ``openai.AsyncOpenAI`` for :class:`ChatClient`: its own retries off (ours count
    against the budget and share ``Retry-After``). ``base_url`` None: OpenAI's (or
    ``$OPENAI_BASE_URL``)."""
    return openai.AsyncOpenAI(api_key=api_key, base_url=base_url or None, timeout=timeout, max_retries=0)


def chat_client_from_config(cfg: Any, *, dry_run: bool = False) -> "ChatClient":
    """The :class:`ChatClient` of a recipe config: ``client.base_url``, ``client.api_key_env``,
    ``client.timeout``, ``retry.*``, ``max_requests`` and ``seed`` (jitter)."""
    client = cfg.client
    retry = RetryPolicy(
        max_attempts=cfg.retry.max_attempts,
        backoff_base=cfg.retry.backoff_base,
        backoff_max=cfg.retry.backoff_max,
        max_retry_after=cfg.retry.max_retry_after,
    )
    api_key = api_key_from_env(client.api_key_env, required=not dry_run)
    return ChatClient(
        None if dry_run else async_openai_client(client.base_url, api_key, client.timeout),
        retry=retry,
        budget=RequestBudget(cfg.get("max_requests")),
        rng=random.Random(cfg.get("seed")),
    )


class ChatClient:
    """A run's connection to one chat endpoint, shared by all its workers.

    Args:
        client: an ``openai.AsyncOpenAI`` built with ``max_retries=0`` (:func:`async_openai_client`).
        retry: attempts and backoff.
        budget: the run's request budget.
        rng: jitter source.

    ``stop_reason`` is set when the run should end early (budget spent, quota, the endpoint
    failing); ``answered`` counts responses received.
    """

    def __init__(
        self, client: Any, *, retry: RetryPolicy, budget: RequestBudget, rng: Optional[random.Random] = None
    ) -> None:
        self.client = client
        self.retry = retry
        self.budget = budget
        self.rng = rng or random.Random()
        self.stop_reason: Optional[str] = None
        self.answered = 0
        self._paused_until = 0.0  # monotonic time before which no worker sends

    async def complete(self, request: Dict[str, Any], judge: Judge, meta: Optional[Dict[str, Any]] = None) -> Outcome:
        """Send ``request`` (keyword arguments of ``chat.completions.create``) until ``judge``
        accepts a reply or the attempts run out. Returns the outcome: ``ok`` with the judged
        text, ``rejected`` with the last reason, or ``stopped`` (the record stays pending).
        ``meta`` goes into the outcome, ``model`` set to the model that answered."""
        usage = Usage()
        reason, detail = "no_attempt", ""
        meta = dict(meta or {})
        meta.setdefault("model", request.get("model"))
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
                reason, detail = f"http_{status}", error_message(err)
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
                            f"the request settings): {detail}"
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
                meta["model"] = getattr(response, "model", None) or meta["model"]
                reason, text = judge(response)
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

    async def close(self) -> None:
        """Close the HTTP connections."""
        if self.client is not None:
            await self.client.close()

    # ---- shared pause on rate limits --------------------------------------------------------

    def _pause(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    async def _wait_while_paused(self) -> None:
        while (remaining := self._paused_until - time.monotonic()) > 0:
            await asyncio.sleep(remaining)


def error_message(err: Any) -> str:
    """The server's error message, falling back to the exception text."""
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])[:300]
    return str(err)[:300]

