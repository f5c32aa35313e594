"""Stage 1, openai backend, against an OpenAI-compatible HTTP server started here on 127.0.0.1.

The real ``openai`` client talks real HTTP to a small threaded server that misbehaves on purpose,
per record, chosen from the record's text (``case=...``): 429 with Retry-After, 500s, answers
slower than the client timeout, refusals, unchanged or overlong answers, 400s. Every input id must
end up in the output or in the rejects file, never twice, and a run killed with SIGKILL and
resumed must give the same ids as an uninterrupted run.
"""

import json

import pytest
from PIL import Image

import povid_hallucinate
from povid_data.hallucinate_openai import looks_like_reasoning
from povid_data.openai_client import RetryPolicy, retry_after_seconds

from _chat_server import KEY_ENV, FakeChatServer, kill_when_written


@pytest.fixture
def server():
    s = FakeChatServer()
    yield s
    s.close()


@pytest.fixture
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")


def _records(cases, tmp_path):
    Image.new("RGB", (8, 6), (200, 30, 30)).save(tmp_path / "img.png")
    records = []
    for i, case in enumerate(cases):
        rid = f"r{i:02d}"
        records.append({
            "id": rid, "image": "img.png",
            "conversations": [{"from": "human", "value": "<image>\nDescribe this image in detail."},
                              {"from": "gpt", "value": f"rid={rid} case={case}. A red bus waits beside two cars."}],
        })  # fmt: skip
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    return records, data


def _overrides(server, data, out, *extra):
    return [
        "--config", "povid_hallucinate_openai", f"data_file={data}", f"output_dir={out}",
        f"client.base_url={server.base_url}", "client.model=fake-4o", f"client.api_key_env={KEY_ENV}",
        "client.timeout=0.5", "retry.backoff_base=0.02", "retry.max_attempts=4", "concurrency=4",
        *extra,
    ]  # fmt: skip


def _ids(path):
    return [json.loads(line)["id"] for line in path.read_text().splitlines()] if path.exists() else []


CASES = ["ok", "rate", "e500", "slow", "refuse", "refuse_once", "same", "dead", "long", "badreq",
         "ok", "ok", "e500", "ok", "slow", "ok"]  # fmt: skip
EXPECTED_REJECTS = {"refuse": "refusal", "same": "unchanged", "dead": "http_500", "long": "too_long",
                    "badreq": "http_400"}  # fmt: skip


def test_every_id_ends_up_once_in_output_or_rejects(server, api_key, tmp_path, capsys):
    records, data = _records(CASES, tmp_path)
    out = tmp_path / "out"
    status = povid_hallucinate.main(_overrides(server, data, out))
    assert status == 0
    written, rejected = _ids(out / "preferences.jsonl"), _ids(out / "rejects.jsonl")
    assert len(written) == len(set(written)) and len(rejected) == len(set(rejected))
    assert set(written).isdisjoint(rejected)
    assert set(written) | set(rejected) == {r["id"] for r in records}

    # The right records are rejected, for the right reason.
    reasons = {json.loads(l)["id"]: json.loads(l)["reason"] for l in (out / "rejects.jsonl").read_text().splitlines()}
    assert reasons == {f"r{i:02d}": EXPECTED_REJECTS[c] for i, c in enumerate(CASES) if c in EXPECTED_REJECTS}

    # Retries are ours, not the client's: a dead record got exactly max_attempts requests, a
    # bad request one; slow, 500 and refuse-once records were retried until they succeeded.
    hits = {rid: [s for _, s in reqs] for rid, reqs in server.requests.items()}
    assert hits["r07"] == [500] * 4 and hits["r09"] == [400]
    assert hits["r02"] == [500, 500, 200] and hits["r05"] == [200, 200]
    assert hits["r03"] == ["slow", 200]  # timed out once, then answered
    # Retry-After: 1 was honoured (our backoff base is 0.02 s).
    (t1, s1), (t2, s2) = server.requests["r01"]
    assert (s1, s2) == (429, 200) and t2 - t1 >= 0.95

    # The image went as a data URL; the answer in POVID's format with our metadata.
    parts = server.bodies[0]["messages"][-1]["content"]
    assert parts[1]["image_url"]["url"].startswith("data:image/png;base64,")
    rows = {json.loads(l)["id"]: json.loads(l) for l in (out / "preferences.jsonl").read_text().splitlines()}
    row, record = rows["r02"], records[2]
    assert {k: row[k] for k in record} == record
    assert row["rejected_conversations"][-1]["value"].startswith("rid=r02 case=e500. A blue bus")
    meta = row["povid_meta"]["stage1"]
    assert meta["backend"] == "openai" and meta["model"] == "fake-4o-0001" and meta["seed"] == 0
    assert meta["kinds"] is None and meta["kinds_requested"] == ["object_cooccurrence", "relation", "attribute"]
    assert meta["attempts"] == 3 and meta["usage"] == {"prompt_tokens": 100, "completion_tokens": 20, "requests": 3}

    # Usage and cost at the end: every answer the client received counts 100 + 20 tokens.
    answered = sum(s == 200 for reqs in hits.values() for s in reqs)
    total = sum(len(v) for v in hits.values())
    printed = capsys.readouterr().out
    assert f"{len(written)} written, {len(rejected)} rejected" in printed
    assert f"requests: {total}, tokens: {100 * answered} prompt + {20 * answered} completion" in printed
    cost = (100 * answered * 2.5 + 20 * answered * 10.0) / 1e6
    assert f"estimated cost: {cost:.4f} USD" in printed

    # A rerun has nothing to do and sends nothing.
    before = total
    assert povid_hallucinate.main(_overrides(server, data, out)) == 0
    assert sum(len(v) for v in server.requests.values()) == before
    assert f"0 written, 0 rejected, {len(records)} skipped as already done" in capsys.readouterr().out


def test_budget_stops_the_run_and_a_rerun_finishes(server, api_key, tmp_path, capsys):
    records, data = _records(["ok"] * 6 + ["e500"] + ["ok"] * 3, tmp_path)
    out = tmp_path / "out"
    # 5 requests for 10 records: the run stops, leaves the rest pending, reports it, exits 1.
    assert povid_hallucinate.main(_overrides(server, data, out, "max_requests=5", "concurrency=1")) == 1
    assert len(_ids(out / "preferences.jsonl")) == 5 and _ids(out / "rejects.jsonl") == []
    assert "request budget of 5 spent" in capsys.readouterr().out
    assert sum(len(v) for v in server.requests.values()) == 5
    assert povid_hallucinate.main(_overrides(server, data, out)) == 0
    assert sorted(_ids(out / "preferences.jsonl")) == [r["id"] for r in records]


def test_rejects_can_be_retried(server, api_key, tmp_path):
    records, data = _records(["ok", "refuse_once", "ok"], tmp_path)
    out = tmp_path / "out"
    assert povid_hallucinate.main(_overrides(server, data, out, "retry.max_attempts=1")) == 0
    assert _ids(out / "rejects.jsonl") == ["r01"]
    assert povid_hallucinate.main(_overrides(server, data, out, "retry_rejects=true")) == 0
    assert sorted(_ids(out / "preferences.jsonl")) == ["r00", "r01", "r02"]
    assert _ids(out / "rejects.jsonl") == [] and len(list(out.glob("rejects.*.jsonl"))) == 1


def test_bad_key_stops_with_a_clear_error_and_keeps_output(server, api_key, tmp_path):
    records, data = _records(["ok", "ok", "auth", "ok"], tmp_path)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=r"401 from the endpoint .*client.api_key_env.*bad key"):
        povid_hallucinate.main(_overrides(server, data, out, "concurrency=1"))
    assert _ids(out / "preferences.jsonl") == ["r00", "r01"]


def test_a_bad_request_before_any_success_is_a_config_error(server, api_key, tmp_path):
    records, data = _records(["badreq", "ok"], tmp_path)
    with pytest.raises(SystemExit, match="400 from the endpoint before any success.*cannot read image"):
        povid_hallucinate.main(_overrides(server, data, tmp_path / "out", "concurrency=1"))
    assert _ids(tmp_path / "out" / "rejects.jsonl") == []


def test_missing_key_variable_and_missing_image_fail_before_any_request(server, tmp_path, monkeypatch):
    records, data = _records(["ok"], tmp_path)
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ValueError, match=f"environment variable {KEY_ENV} is not set"):
        povid_hallucinate.main(_overrides(server, data, tmp_path / "out"))
    monkeypatch.setenv(KEY_ENV, "sk-test")
    (tmp_path / "img.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"data\.jsonl: record id='r00': field 'image': file not found"):
        povid_hallucinate.main(_overrides(server, data, tmp_path / "out"))
    assert not server.requests


def test_dry_run_prints_requests_and_sends_nothing(server, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(KEY_ENV, raising=False)  # no key needed to look
    records, data = _records(["ok", "ok", "ok"], tmp_path)
    assert povid_hallucinate.main(_overrides(server, data, tmp_path / "out", "dry_run=true", "dry_run_count=2")) == 0
    printed = capsys.readouterr().out
    assert printed.count('"model": "fake-4o"') == 2 and "data:image/png;base64," in printed
    assert "rid=r01 case=ok" in printed and "rid=r02" not in printed
    assert not server.requests and not (tmp_path / "out").exists()


def test_helpers():
    assert retry_after_seconds({"retry-after": "2"}) == 2.0
    assert retry_after_seconds({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0  # a past date
    assert retry_after_seconds({}) is None and retry_after_seconds({"retry-after": "soon"}) is None
    import random

    policy, rng = RetryPolicy(backoff_base=1.0, backoff_max=8.0), random.Random(0)
    for attempt, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (6, 8.0)]:
        waits = [policy.backoff(attempt, rng) for _ in range(50)]
        assert all(cap / 2 <= w <= cap for w in waits) and len(set(waits)) > 1  # jittered
    assert looks_like_reasoning("Why might the man be holding an umbrella?", "It is raining.")
    assert looks_like_reasoning("What is shown?", "It is likely raining, because the street is wet.")
    assert not looks_like_reasoning("Describe this image in detail.", "A red bus on a street.")


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_gives_the_same_ids(tmp_path, api_key):
    cases = ["ok"] * 4 + ["rate", "refuse", "e500", "ok", "slow", "same"] + ["ok", "e500", "refuse"] * 4
    records, data = _records(cases, tmp_path)
    all_ids = {r["id"] for r in records}

    reference_server = FakeChatServer()
    try:
        ref = tmp_path / "ref"
        assert povid_hallucinate.main(_overrides(reference_server, data, ref, "flush_every=1")) == 0
    finally:
        reference_server.close()

    server = FakeChatServer(ok_delay=0.15)  # slow enough to be killed half-way
    try:
        out = tmp_path / "killed"
        argv = _overrides(server, data, out, "flush_every=1", "concurrency=2")
        kill_when_written("povid_hallucinate", argv, tmp_path, out / "preferences.jsonl", lines=6)
        done_before = set(_ids(out / "preferences.jsonl")) | set(_ids(out / "rejects.jsonl"))
        assert 6 <= len(done_before) < len(records), "killed too late to prove anything"

        assert povid_hallucinate.main(argv) == 0  # resume in-process
    finally:
        server.close()

    for name in ("preferences.jsonl", "rejects.jsonl"):
        resumed, reference = _ids(out / name), _ids(ref / name)
        assert len(resumed) == len(set(resumed)), f"duplicate ids in {name}"
        assert set(resumed) == set(reference), name
    assert set(_ids(out / "preferences.jsonl")) | set(_ids(out / "rejects.jsonl")) == all_ids
