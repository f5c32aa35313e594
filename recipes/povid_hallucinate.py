"""Recipe ``povid_hallucinate``: POVID stage 1, hallucinated rewrites of ground-truth answers.

For every record (image, instruction, ground-truth answer) the last answer is rewritten so that
it contains plausible hallucinations (objects that co-occur with what is there, wrong
relationships, wrong attributes; corrupted steps for reasoning answers). The ground truth is
POVID's preferred answer, the rewrite the dispreferred one. Two backends:

- ``openai`` (config ``povid_hallucinate_openai``): any OpenAI-compatible chat endpoint (a
  GPT-4o-class model by default; vLLM and other servers through ``client.base_url``), image sent
  as a data URL. Async requests under a concurrency limit, our own retries (backoff with
  jitter, ``Retry-After`` honoured), a request budget, every answer validated.
- ``rules`` (config ``povid_hallucinate_rules``): offline and deterministic given ``seed``:
  one or two changes per answer (an object added at a sentence boundary or swapped in, from a
  co-occurrence table built from the input data; an attribute, count, position or reasoning
  word changed), counts kept consistent, each change reported.
- ``world`` (config ``povid_hallucinate_world``): the synthetic world's scene-level injector
  (:mod:`povid_data.hallucinate_scene`): the ground-truth caption is read back into its scene,
  the scene changed (a companion added or swapped in, a colour, size or position changed) and
  captioned again in the world's grammar.

Output: ``${output_dir}/preferences.jsonl``, one line per record: the input record unchanged
plus ``rejected_conversations`` and ``povid_meta.stage1`` (backend, model, seed, kinds, edits,
usage). Records with no usable rewrite go to ``${output_dir}/rejects.jsonl`` with the reason.
Both are appended in batches and fsynced; a rerun skips every id in either file, so a killed run
resumes where it stopped (``retry_rejects=true`` gives rejected ids another try).

Run::

    export OPENAI_API_KEY=...
    tune run povid_hallucinate --config povid_hallucinate_openai \\
        data_file=detail_23k.json image_dir=coco/train2014 output_dir=out/stage1
    tune run povid_hallucinate --config povid_hallucinate_rules data_file=... output_dir=...
    tune run povid_hallucinate --config povid_hallucinate_world data_file=world/pref.json output_dir=...

``dry_run=true`` prints the first requests (or rewrites) and sends nothing. The exit status is 1
when the run stopped before every record was done (budget spent, endpoint failing).
"""

import json
import random
import re
import sys
from pathlib import Path
from typing import Any, Dict, Optional

from omegaconf import DictConfig, OmegaConf

from povid.config import parse
from povid_data.hallucinate import (
    DEFAULT_REFUSAL_PATTERNS,
    Outcome,
    ValidationRules,
    check_rewrite,
    preference_record,
    reject_record,
)
from povid_data.hallucinate_openai import OpenAIHallucinator, PromptTemplates
from povid_data.hallucinate_rules import CooccurrenceTable, ObjectVocabulary, RulesHallucinator
from povid_data.hallucinate_scene import DEFAULT_WEIGHTS, SceneInjector
from povid_data.openai_client import (
    ChatClient,
    FatalAPIError,
    RequestBudget,
    RetryPolicy,
    api_key_from_env,
    async_openai_client,
)
from povid_data.records import CHOSEN, question_and_answer, read_llava_records, resolve_image
from povid_data.synthetic_world import KINDS as WORLD_KINDS
from povid_data.record_run import RecordRun, RunSummary, move_rejects_aside
from povid_data.synthetic_world import CaptionParseError, parse_caption

# Name the offline backends in povid_meta; bump when they change what they produce
# (povid-rules-2: one or two changes at sentence boundaries, counts kept consistent).
RULES_MODEL = "povid-rules-2"
WORLD_MODEL = "povid-world-scene-1"
OFFLINE_MODELS = {"rules": RULES_MODEL, "world": WORLD_MODEL}
BACKENDS = ("openai", "rules", "world")


def _turn_text(turn: Dict[str, Any]) -> str:
    return str(turn.get("value", turn.get("content", "")))


class HallucinateRecipe:
    """Reads the records, builds the backend, rewrites every pending record, writes results."""

    def __init__(self, cfg: DictConfig) -> None:
        if cfg.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {list(BACKENDS)}, got {cfg.backend!r}")
        self.cfg = cfg
        self.backend = cfg.backend
        self.summary = RunSummary()

    # ---- setup ------------------------------------------------------------------------------

    def setup(self) -> None:
        """Read and check every record (before any output is touched), build the backend."""
        cfg = self.cfg
        if not cfg.data_file:
            raise ValueError("povid_hallucinate needs data_file=RECORDS (JSON list or JSONL)")
        # Every record is validated here: a bad one stops the run before anything is written,
        # with an error naming the file, the record id and the field.
        all_records, self.source = read_llava_records(cfg.data_file, require=(CHOSEN,))
        self.records = all_records[: cfg.limit] if cfg.limit else all_records
        self.image_dir = Path(cfg.image_dir) if cfg.image_dir else Path(str(cfg.data_file)).parent
        self.validation = ValidationRules(
            min_length_ratio=cfg.validation.min_length_ratio,
            max_length_ratio=cfg.validation.max_length_ratio,
            length_slack_chars=cfg.validation.length_slack_chars,
            refusal_patterns=list(cfg.validation.refusal_patterns or DEFAULT_REFUSAL_PATTERNS),
        )
        if self.backend == "rules":
            vocabulary = ObjectVocabulary()
            # Counted over the whole file, not just `limit` or the pending records, so that a
            # rerun or a partial run makes exactly the same choices.
            table = CooccurrenceTable.from_texts(
                (" ".join(_turn_text(t) for t in r[CHOSEN][1::2]) for r in all_records), vocabulary
            )
            self.rules = RulesHallucinator(
                table,
                seed=cfg.seed,
                kinds=list(cfg.rules.kinds),
                max_edits=cfg.rules.max_edits,
                extra_edit_rate=cfg.rules.get("extra_edit_rate", 0.3),
                weights=_plain(cfg.rules.get("weights")),
                top_companions=cfg.rules.top_companions,
                addition_templates=list(cfg.rules.addition_templates),
                vocabulary=vocabulary,
                only_seen=cfg.rules.get("only_seen", False),
            )
        elif self.backend == "world":
            self._setup_world()
        else:
            self._setup_openai()

    def _setup_world(self) -> None:
        # Code defaults for keys the config leaves out, so `backend=world` works from any of
        # the recipe's configs (the demo passes it to povid_hallucinate_rules).
        world = _plain(self.cfg.get("world")) or {}
        self.injector = SceneInjector(
            seed=self.cfg.seed,
            weights=world.get("weights", DEFAULT_WEIGHTS),
            max_edits=world.get("max_edits", 2),
            extra_edit_rate=world.get("extra_edit_rate", 0.25),
            addition_fallback=world.get("addition_fallback", True),
        )
        # Every answer is read back into its scene now: a file that is not the world's stops
        # the run before anything is written, naming the record.
        self.scenes = {}
        for record in self.records:
            _, answer = question_and_answer(record)
            try:
                self.scenes[str(record["id"])] = parse_caption(answer)
            except CaptionParseError as err:
                raise ValueError(f"{self.source}: record id={record['id']!r}: the answer is {err} "
                                 f"(backend world reads synthetic-world captions only)") from None  # fmt: skip

    def _setup_openai(self) -> None:
        cfg, client = self.cfg, self.cfg.client
        if client.send_image:
            # Missing images fail now, not after hours of paid requests.
            self.images = {str(r["id"]): resolve_image(r, self.image_dir, self.source) for r in self.records}
        else:
            self.images = {}
        self.api_key = api_key_from_env(client.api_key_env, required=not cfg.dry_run)
        # Unset (null) parameters are left out: the server's defaults apply.
        params = {k: v for k, v in {"max_tokens": client.max_tokens, "temperature": client.temperature}.items()
                  if v is not None}  # fmt: skip
        if client.send_seed and cfg.seed is not None:
            params["seed"] = cfg.seed
        if client.extra_body:
            params["extra_body"] = OmegaConf.to_container(client.extra_body, resolve=True)
        self.prompts = PromptTemplates(
            system=cfg.prompts.system,
            description=cfg.prompts.description,
            reasoning=cfg.prompts.reasoning,
            reasoning_detection=cfg.prompts.reasoning_detection,
        )
        self.budget = RequestBudget(cfg.max_requests)
        self.retry = RetryPolicy(
            max_attempts=cfg.retry.max_attempts,
            backoff_base=cfg.retry.backoff_base,
            backoff_max=cfg.retry.backoff_max,
            max_retry_after=cfg.retry.max_retry_after,
        )
        self.request_params = params

    # ---- run --------------------------------------------------------------------------------

    def run(self) -> RunSummary:
        """Rewrite every pending record; print a summary. Returns it."""
        if self.cfg.dry_run:
            self._dry_run()
            return self.summary
        cfg = self.cfg
        if cfg.retry_rejects and Path(cfg.rejects_file).exists():
            aside = move_rejects_aside(Path(cfg.rejects_file))
            print(f"retry_rejects: moved {cfg.rejects_file} to {aside}; its ids are tried again")
        self.run_files = RecordRun(
            cfg.output_file, cfg.rejects_file,
            make_output=lambda record, outcome: preference_record(record, outcome.text, self._stage_meta(outcome)),
            make_reject=lambda record, outcome: reject_record(record, outcome, self._stage_meta(outcome)),
            desc=f"hallucinate[{self.backend}]", flush_every=cfg.flush_every, flush_seconds=cfg.flush_seconds,
        )  # fmt: skip
        todo = self.run_files.pending(self.records)
        if self.backend == "openai":
            self.summary = self._run_openai(todo)
        else:
            self.summary = self.run_files.run_concurrent(todo, self._offline_outcome_of, concurrency=1)
        self._print_summary()
        return self.summary

    def _run_openai(self, todo) -> RunSummary:
        chat = ChatClient(
            async_openai_client(self.cfg.client.base_url, self.api_key, self.cfg.client.timeout),
            retry=self.retry, budget=self.budget, rng=random.Random(self.cfg.seed),
        )  # fmt: skip
        hallucinator = self._hallucinator(chat)

        async def rewrite(record: Dict[str, Any]) -> Outcome:
            question, answer = question_and_answer(record)
            return await hallucinator.rewrite(question, answer, self.images.get(str(record["id"])))

        return self.run_files.run_concurrent(todo, rewrite, concurrency=self.cfg.concurrency, close=chat.close)

    def _hallucinator(self, chat: Optional[ChatClient]) -> OpenAIHallucinator:
        client = self.cfg.client
        return OpenAIHallucinator(
            chat, model=client.model, prompts=self.prompts, validation=self.validation,
            send_image=client.send_image, image_detail=client.image_detail, request_params=self.request_params,
        )  # fmt: skip

    async def _offline_outcome_of(self, record: Dict[str, Any]) -> Outcome:
        _, answer = question_and_answer(record)
        return self._rules_outcome(record, answer) if self.backend == "rules" else self._world_outcome(record, answer)

    def _rules_outcome(self, record: Dict[str, Any], answer: str) -> Outcome:
        # Everything in the conversation but the answer being rewritten: injected objects must
        # be absent from all of it.
        context = "\n".join(_turn_text(t) for t in record[CHOSEN][:-1])
        return self._offline_outcome(answer, self.rules.rewrite(str(record["id"]), answer, context), RULES_MODEL)

    def _world_outcome(self, record: Dict[str, Any], answer: str) -> Outcome:
        context = " ".join(_turn_text(t) for t in record[CHOSEN][:-1])
        # Kinds an earlier turn names (a question about a donut) are never injected either.
        named = {kind for kind in WORLD_KINDS if re.search(rf"\b{re.escape(kind)}s?\b", context, re.IGNORECASE)}
        rewrite = self.injector.rewrite(str(record["id"]), self.scenes[str(record["id"])], named)
        return self._offline_outcome(answer, rewrite, WORLD_MODEL)

    def _offline_outcome(self, answer: str, rewrite: Any, model: str) -> Outcome:
        """The outcome of an offline backend's rewrite (``text``, ``kinds``, ``edits``), validated
        like a model's answer."""
        meta = {"model": model, "kinds": rewrite.kinds, "edits": rewrite.edits}
        if not rewrite.edits:
            return Outcome("rejected", reason="no_applicable_edit", attempts=1, meta=meta)
        reason = check_rewrite(answer, rewrite.text, self.validation)
        if reason:
            return Outcome("rejected", reason=reason, detail=rewrite.text[:300], attempts=1, meta=meta)
        return Outcome("ok", text=rewrite.text, attempts=1, meta=meta)

    def _stage_meta(self, outcome: Outcome) -> Dict[str, Any]:
        meta: Dict[str, Any] = {
            "backend": self.backend,
            "model": outcome.meta.get("model", OFFLINE_MODELS.get(self.backend) or self.cfg.client.model),
            "seed": self.cfg.seed,
            "kinds": outcome.meta.get("kinds"),
        }
        meta.update({k: v for k, v in outcome.meta.items() if k not in meta})
        if self.backend == "openai":
            meta["attempts"] = outcome.attempts
            meta["usage"] = outcome.usage.as_dict()
        return meta

    # ---- reporting --------------------------------------------------------------------------

    def _print_summary(self) -> None:
        s, cfg = self.summary, self.cfg
        lines = s.lines("povid_hallucinate", cfg.output_file, cfg.rejects_file)
        if self.backend == "openai":
            cost = s.usage.cost(cfg.pricing.input_per_1m, cfg.pricing.output_per_1m)
            lines.insert(3, f"  estimated cost: {cost:.4f} {cfg.pricing.currency} (at {cfg.pricing.input_per_1m} / "
                            f"{cfg.pricing.output_per_1m} per 1M input / output tokens)")  # fmt: skip
        print("\n".join(lines))

    def _dry_run(self) -> None:
        """Print what the first records would give, send nothing, write nothing."""
        first = self.records[: self.cfg.dry_run_count]
        for record in first:
            question, answer = question_and_answer(record)
            if self.backend in OFFLINE_MODELS:
                outcome = self._rules_outcome(record, answer) if self.backend == "rules" else self._world_outcome(record, answer)
                shown: Dict[str, Any] = {"id": record["id"], "status": outcome.status, "reason": outcome.reason,
                                         "rewrite": outcome.text, "edits": outcome.meta.get("edits")}
            else:
                request = self._hallucinator(None).request(question, answer, self.images.get(str(record["id"])))
                shown = {"id": record["id"], "base_url": self.cfg.client.base_url, "request": _shorten_data_urls(request)}
            print(json.dumps(shown, indent=2, ensure_ascii=False))
        print(f"dry_run: showed {len(first)} of {len(self.records)} records; nothing sent or written.")

    def cleanup(self) -> None:
        """Close the output files."""
        run_files = getattr(self, "run_files", None)
        if run_files is not None:
            run_files.close()


def _plain(node: Any) -> Any:
    """A config node as plain Python (None stays None)."""
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _shorten_data_urls(value: Any) -> Any:
    """A copy of a request with base64 image payloads cut to a readable length."""
    if isinstance(value, dict):
        return {k: _shorten_data_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shorten_data_urls(v) for v in value]
    if isinstance(value, str) and value.startswith("data:") and len(value) > 80:
        return f"{value[:60]}...({len(value)} chars)"
    return value


@parse
def main(cfg: DictConfig) -> int:
    """Entry point for ``tune run povid_hallucinate --config povid_hallucinate_openai|rules|world``."""
    recipe = HallucinateRecipe(cfg)
    recipe.setup()
    try:
        summary = recipe.run()
    except FatalAPIError as err:
        raise SystemExit(f"povid_hallucinate: {err}") from None
    finally:
        recipe.cleanup()
    return 1 if summary.pending else 0


if __name__ == "__main__":
    sys.exit(main())
