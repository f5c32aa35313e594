"""A file of records through a backend, into an output file and a rejects file, resumable by id.

Every recipe that sends records to a model one by one (``povid_hallucinate``; ``povid_generate``,
``povid_distort`` and ``povid_eval`` with ``backend: openai``) runs them through a
:class:`RecordRun`: the ids already in either file are skipped, so a killed run resumes where it
stopped; outcomes are buffered and appended (fsynced) every ``flush_every`` records or
``flush_seconds`` seconds, and whatever ends the run, finished work reaches disk; an ``ok``
outcome becomes an output line, a ``rejected`` one a rejects line with its reason, a ``stopped``
one leaves its record pending and ends the run; a progress bar counts them.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional, Sequence

from tqdm import tqdm

from povid_data.hallucinate import Outcome, Usage
from povid_data.jsonl import ResumableJsonlWriter

__all__ = ["RecordRun", "RunSummary", "move_rejects_aside"]

Record = Dict[str, Any]
MakeLine = Callable[[Record, Outcome], Record]


@dataclass
class RunSummary:
    """What a run did."""

    written: int = 0
    rejected: int = 0
    skipped: int = 0
    pending: int = 0
    reasons: Counter = field(default_factory=Counter)
    usage: Usage = field(default_factory=Usage)
    stop_reason: Optional[str] = None
    seconds: float = 0.0

    def lines(self, name: str, output_file: str | Path, rejects_file: str | Path) -> List[str]:
        """The report printed at the end of a run (without cost: the caller knows the prices)."""
        reasons = ", ".join(f"{k}: {v}" for k, v in self.reasons.most_common())
        out = [
            f"{name}: {self.written} written, {self.rejected} rejected"
            + (f" ({reasons})" if reasons else "")
            + f", {self.skipped} skipped as already done, {self.pending} pending, in {self.seconds:.1f} s",
            f"  output: {output_file}",
            f"  rejects: {rejects_file}",
        ]
        if self.usage.requests:
            out.append(
                f"  requests: {self.usage.requests}, tokens: {self.usage.prompt_tokens} prompt + "
                f"{self.usage.completion_tokens} completion"
            )
        if self.stop_reason:
            out.append(f"  stopped early: {self.stop_reason}. A rerun resumes with the {self.pending} pending records.")
        return out


def move_rejects_aside(path: Path) -> Path:
    """Rename a rejects file (never over an older one) so that its ids are pending again."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside, n = path.with_suffix(f".{stamp}.jsonl"), 1
    while aside.exists():
        aside, n = path.with_suffix(f".{stamp}-{n}.jsonl"), n + 1
    path.rename(aside)
    return aside


class RecordRun:
    """One run over a file of records (see the module docstring).

    Args:
        output_file, rejects_file: JSONL files, appended to; their ids count as done.
        make_output: the output line of a record and its ``ok`` outcome.
        make_reject: the rejects line of a record and its ``rejected`` outcome.
        desc: the progress bar's label.
        flush_every, flush_seconds: buffer at most this many outcomes, or this long.
    """

    def __init__(
        self,
        output_file: str | Path,
        rejects_file: str | Path,
        *,
        make_output: MakeLine,
        make_reject: MakeLine,
        desc: str,
        flush_every: int = 32,
        flush_seconds: float = 10.0,
    ) -> None:
        self.make_output = make_output
        self.make_reject = make_reject
        self.desc = desc
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.summary = RunSummary()
        self.out = ResumableJsonlWriter(output_file)
        self.rejects = ResumableJsonlWriter(rejects_file)
        self._buffers: Dict[str, List[Record]] = {"out": [], "rejects": []}
        self._last_flush = time.monotonic()
        self._total = 0
        self.bar: Optional[tqdm] = None

    def pending(self, records: Sequence[Record]) -> List[Record]:
        """The records whose id is in neither file, in order (the rest count as skipped)."""
        done = self.out.done | self.rejects.done
        todo = [r for r in records if str(r["id"]) not in done]
        self._total = len(records)
        self.summary.skipped = len(records) - len(todo)
        return todo

    # ---- driving a backend ------------------------------------------------------------------

    def run_concurrent(
        self,
        todo: Sequence[Record],
        handle: Callable[[Record], Awaitable[Outcome]],
        concurrency: int,
        close: Optional[Callable[[], Awaitable[None]]] = None,
    ) -> RunSummary:
        """``concurrency`` workers take the records of ``todo`` one at a time (each record by
        exactly one) and await ``handle``; a ``stopped`` outcome ends the run. ``close`` is
        awaited at the end, in the same event loop (an HTTP client's connections belong to it)."""

        async def main() -> None:
            pending = iter(todo)

            async def worker() -> None:
                for record in pending:
                    if self.summary.stop_reason:
                        return  # the record taken stays pending for a rerun
                    self.collect(record, await handle(record))

            workers = [asyncio.ensure_future(worker()) for _ in range(max(1, concurrency))]
            try:
                await asyncio.gather(*workers)
            finally:
                for w in workers:
                    w.cancel()
                await asyncio.gather(*workers, return_exceptions=True)
                if close is not None:
                    await close()

        return self._driven(lambda: asyncio.run(main()))

    def run_batches(
        self, todo: Sequence[Record], handle_batch: Callable[[List[Record]], List[Outcome]], batch_size: int
    ) -> RunSummary:
        """``handle_batch`` on consecutive batches of ``todo`` (a local model's batched step)."""

        def main() -> None:
            for i in range(0, len(todo), batch_size):
                batch = list(todo[i : i + batch_size])
                for record, outcome in zip(batch, handle_batch(batch), strict=True):
                    self.collect(record, outcome)
                if self.summary.stop_reason:
                    return

        return self._driven(main)

    def _driven(self, main: Callable[[], None]) -> RunSummary:
        start = time.monotonic()
        self.bar = tqdm(total=self._total, initial=self.summary.skipped, desc=self.desc)
        try:
            main()
        finally:
            # Whatever ended the run (done, stopped, an exception), finished work reaches disk.
            self.flush()
            self.bar.close()
        s = self.summary
        s.pending = self._total - s.skipped - s.written - s.rejected
        s.seconds = time.monotonic() - start
        return s

    # ---- outcomes ---------------------------------------------------------------------------

    def collect(self, record: Record, outcome: Outcome) -> None:
        """Buffer one outcome; flush the buffers when they are big or old enough."""
        self.summary.usage.add(outcome.usage)
        if outcome.status == "stopped":
            self.summary.stop_reason = self.summary.stop_reason or outcome.reason
            return
        if outcome.status == "ok":
            self._buffers["out"].append(self.make_output(record, outcome))
            self.summary.written += 1
        else:
            self._buffers["rejects"].append(self.make_reject(record, outcome))
            self.summary.rejected += 1
            self.summary.reasons[outcome.reason] += 1
            if self.bar is not None:
                self.bar.set_postfix(rejected=self.summary.rejected)
        if self.bar is not None:
            self.bar.update(1)
        buffered = len(self._buffers["out"]) + len(self._buffers["rejects"])
        if buffered >= self.flush_every or time.monotonic() - self._last_flush >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Append and fsync what is buffered."""
        self.out.write(self._buffers["out"])
        self.rejects.write(self._buffers["rejects"])
        self._buffers = {"out": [], "rejects": []}
        self._last_flush = time.monotonic()

    def close(self) -> None:
        """Flush and close both files."""
        self.flush()
        self.out.close()
        self.rejects.close()

