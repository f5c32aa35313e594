"""``backend: openai`` of the answering recipes, against the test chat server on 127.0.0.1."""

import base64
import io
import json

import pytest
from PIL import Image

import povid_distort
import povid_generate
from _chat_server import KEY_ENV, FakeChatServer, kill_when_written


@pytest.fixture
def server():
    s = FakeChatServer()
    yield s
    s.close()


def _client(server, *extra):
    return [f"client.base_url={server.base_url}", "client.model=fake-llava", f"client.api_key_env={KEY_ENV}",
            "client.timeout=0.5", "retry.backoff_base=0.02", "retry.max_attempts=4", "concurrency=4", *extra]  # fmt: skip


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


CASES = ["ok", "rate", "e500", "slow", "refuse", "refuse_once", "dead", "long", "badreq", "ok", "ok", "e500"]
REJECTED = {"refuse": "refusal", "dead": "http_500", "badreq": "http_400"}


def test_generate_on_a_server_answers_every_id_once(server, tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    Image.new("RGB", (9, 7), (10, 200, 30)).save(tmp_path / "img.png")
    records = [{"id": f"r{i:02d}", "image": "img.png", "prompt": f"Describe rid=r{i:02d} case={case}"}
               for i, case in enumerate(CASES)]  # fmt: skip
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "out"
    argv = ["--config", "llava_generate", "checkpoint_dir=unused", f"data_file={data}", f"output_dir={out}",
            "backend=openai", "max_new_tokens=77", *_client(server)]  # fmt: skip
    povid_generate.main(argv)

    written, rejects = _lines(out / "generations.jsonl"), _lines(out / "rejects.jsonl")
    ids = [r["id"] for r in written] + [r["id"] for r in rejects]
    assert sorted(ids) == [r["id"] for r in records]  # each id exactly once
    assert {r["id"]: r["reason"] for r in rejects} == {
        r["id"]: REJECTED[case] for r, case in zip(records, CASES) if case in REJECTED
    }
    first = next(r for r in written if r["id"] == "r00")
    # The local backend's line, plus where the answer came from.
    assert first == {"id": "r00", "image": "img.png", "prompt": "Describe rid=r00 case=ok",
                     "response": first["response"],
                     "meta": {"backend": "openai", "model": "fake-4o-0001", "base_url": server.base_url}}  # fmt: skip
    assert first["response"].startswith("rid=r00 case=ok.")
    body = next(b for b in server.bodies if "rid=r00 " in json.dumps(b))
    assert body["max_tokens"] == 77 and body["temperature"] == 0.0 and body["model"] == "fake-llava"
    (message,) = body["messages"]  # no system message: the server's template has the model's own
    image_part, text_part = message["content"]
    assert text_part == {"type": "text", "text": "Describe rid=r00 case=ok"}
    png = base64.b64decode(image_part["image_url"]["url"].split(",", 1)[1])
    assert Image.open(io.BytesIO(png)).tobytes() == Image.open(tmp_path / "img.png").convert("RGB").tobytes()

    # A rerun sends nothing for the ids already done.
    sent = len(server.bodies)
    povid_generate.main(argv)
    assert len(server.bodies) == sent
    assert len(_lines(out / "generations.jsonl")) == len(written)


def test_backend_is_checked_and_the_server_needs_a_file(tmp_path):
    with pytest.raises(ValueError, match="backend"):
        povid_generate.main(["--config", "llava_generate", "checkpoint_dir=x", "backend=vllm", "image=a.png"])
    with pytest.raises(ValueError, match="data_file"):
        povid_generate.main(["--config", "llava_generate", "checkpoint_dir=x", "backend=openai", "image=a.png"])


DISTORT_CASES = ["ok", "e500", "rate", "ok", "refuse", "ok", "slow", "ok"]


def test_distort_on_a_server_sends_the_local_backends_image_and_trains(
    server, tmp_path, monkeypatch, preference_data, tiny_checkpoint
):
    import povid_dpo
    from povid_data.distort import distort_image, noise_seed
    from povid_data.transforms import load_image

    monkeypatch.setenv(KEY_ENV, "sk-test")
    records = [json.loads(line) for line in preference_data.read_text().splitlines()][: len(DISTORT_CASES)]
    for record, case in zip(records, DISTORT_CASES):
        record["conversations"][0]["value"] = f"<image>\nDescribe rid={record['id']} case={case} in detail."
    data = tmp_path / "stage1.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "stage2"
    povid_distort.main(
        ["--config", "povid_distort", "checkpoint_dir=unused", f"data_file={data}", f"image_dir={preference_data.parent}",
         f"output_dir={out}", "backend=openai", "seed=3", "overflow=wrap", "save_images=true", *_client(server)]
    )  # fmt: skip
    written, rejects = _lines(out / "preferences.jsonl"), _lines(out / "rejects.jsonl")
    assert sorted(r["id"] for r in written + rejects) == sorted(r["id"] for r in records)
    assert [r["reason"] for r in rejects] == ["refusal"]
    first = next(r for r in written if r["id"] == records[0]["id"])
    assert first["noise_conversations"][-1]["value"].startswith(f"rid={records[0]['id']} case=ok.")
    assert first["noise_conversations"][:-1] == first["conversations"][:-1]
    stage2 = first["povid_meta"]["stage2"]
    assert (stage2["backend"], stage2["model"], stage2["base_url"]) == ("openai", "fake-4o-0001", server.base_url)
    assert (stage2["seed"], stage2["overflow"], stage2["step"]) == (3, "wrap", 500)

    # The server got exactly the image the local backend would have answered.
    body = next(b for b in server.bodies if f"rid={records[0]['id']} " in json.dumps(b))
    png = base64.b64decode(body["messages"][0]["content"][0]["image_url"]["url"].split(",", 1)[1])
    local = distort_image(load_image(preference_data.parent / records[0]["image"]), 500,
                          seed=noise_seed(records[0]["id"], 3), overflow="wrap")  # fmt: skip
    assert Image.open(io.BytesIO(png)).tobytes() == local.tobytes()
    assert Image.open(out / "distorted" / f"{records[0]['id']}.png").tobytes() == local.tobytes()

    # ... and its output trains as the local backend's does.
    povid_dpo.main(
        ["--config", "povid_tiny_lora", f"checkpoint_dir={tiny_checkpoint}", f"data_file={out / 'preferences.jsonl'}",
         f"image_dir={preference_data.parent}", f"output_dir={tmp_path / 'dpo'}", "max_steps=2", "batch_size=2",
         "save_merged=false"]
    )  # fmt: skip
    logged = _lines(tmp_path / "dpo" / "metrics.jsonl")
    assert len(logged) == 2 and all("logps/noise" in row for row in logged)


def test_eval_on_a_server_scores_the_servers_answers(server, tmp_path, monkeypatch):
    import povid_eval
    from _coco import file_name, write_coco

    monkeypatch.setenv(KEY_ENV, "sk-test")
    images = {21: (["dog", "chair"], ["A dog on a chair."]), 22: (["cat"], ["A cat."]), 23: (["car"], ["A car."])}
    write_coco(tmp_path / "annotations", images)
    (tmp_path / "val2014").mkdir()
    for image_id in images:
        Image.new("RGB", (20 + image_id, 16), (image_id * 5, 40, 90)).save(tmp_path / "val2014" / file_name(image_id))
    out = tmp_path / "chair"
    povid_eval.main(
        ["--config", "eval_chair_coco", f"annotations_dir={tmp_path / 'annotations'}", f"image_dir={tmp_path / 'val2014'}",
         f"output_dir={out}", "num_images=3", "backend=openai", *_client(server)]
    )  # fmt: skip
    result = json.loads((out / "results.json").read_text())
    assert result["protocol"]["backend"] == "openai" and result["protocol"]["model"] == "fake-llava"
    assert result["name"] == "fake-llava"
    # Every caption is the server's "A dog sits on a chair next to a cat.".
    captions = _lines(out / "captions.jsonl")
    assert len(captions) == 3 and all(c["caption"] == server.default_answer for c in captions)
    assert all(b["temperature"] == 0.0 for b in server.bodies)  # the protocol is greedy
    # Hallucinated: the cat in 21, dog and chair in 22, all three in 23: 6 of 9 mentions.
    assert result["metrics"]["chair_i"] == pytest.approx(6 / 9) and result["metrics"]["recall"] == pytest.approx(3 / 4)


def test_compare_lists_the_backend_as_a_protocol_difference():
    from povid.metrics.report import compare_markdown

    def result(protocol):
        return {"format": "povid-eval/1", "benchmark": "chair", "name": protocol["backend"],
                "protocol": protocol, "metrics": {"chair_s": 0.5, "chair_i": 0.2, "recall": 0.8}}  # fmt: skip

    local = result({"generated": True, "backend": "local", "checkpoint_dir": "/ckpt", "decoding": "greedy"})
    served = result({"generated": True, "backend": "openai", "model": "llava-hf/llava-1.5-7b-hf", "decoding": "greedy"})
    text = compare_markdown([local, served])
    assert '- `backend`: local: "local", openai: "openai"' in text


def test_the_servers_chat_template_renders_our_vicuna_v1_prompt():
    import jinja2

    from povid.answering import openai_messages, question_turns
    from povid_data.transforms import VICUNA_V1_CHAT_TEMPLATE, build_vicuna_prompt

    template = jinja2.Environment().from_string(VICUNA_V1_CHAT_TEMPLATE)
    for turns in (
        question_turns("Describe this image in detail."),
        [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A cat."},
         {"from": "human", "value": "Is it asleep?"}],
    ):  # fmt: skip
        messages = openai_messages(turns, "data:image/png;base64,AAAA")
        assert template.render(messages=messages, add_generation_prompt=True) == build_vicuna_prompt(
            turns, add_generation_prompt=True
        )


@pytest.mark.slow
def test_generate_killed_mid_run_resumes_to_the_same_ids(tmp_path, monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-test")
    Image.new("RGB", (9, 7), (10, 200, 30)).save(tmp_path / "img.png")
    cases = ["ok"] * 4 + ["rate", "refuse", "e500", "slow"] + ["ok", "e500", "refuse"] * 4
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"id": f"r{i:02d}", "image": "img.png", "prompt": f"rid=r{i:02d} case={c}"}) + "\n"
                            for i, c in enumerate(cases)))  # fmt: skip
    server = FakeChatServer(ok_delay=0.15)  # slow enough to be killed half-way
    try:
        out = tmp_path / "out"
        argv = ["--config", "llava_generate", "checkpoint_dir=unused", f"data_file={data}", f"output_dir={out}",
                "backend=openai", "flush_every=1", *_client(server, "concurrency=2")]  # fmt: skip
        kill_when_written("povid_generate", argv, tmp_path, out / "generations.jsonl", lines=5)
        done = {r["id"] for r in _lines(out / "generations.jsonl") + _lines(out / "rejects.jsonl")}
        assert 5 <= len(done) < len(cases), "killed too late to prove anything"
        povid_generate.main(argv)  # resume in-process
    finally:
        server.close()
    written, rejects = _lines(out / "generations.jsonl"), _lines(out / "rejects.jsonl")
    ids = [r["id"] for r in written + rejects]
    assert sorted(ids) == [f"r{i:02d}" for i in range(len(cases))]  # each exactly once
    assert {r["id"] for r in rejects} == {f"r{i:02d}" for i, c in enumerate(cases) if c == "refuse"}
