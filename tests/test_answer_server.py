"""``backend: openai`` of the answering recipes, against the test chat server on 127.0.0.1."""

import base64
import io
import json

import pytest
from PIL import Image

import povid_generate
from _chat_server import KEY_ENV, FakeChatServer


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
