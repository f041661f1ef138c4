"""Files and fine-tuning jobs through the official openai client, on a tiny model served in-process."""

from __future__ import annotations

import io
import json
import os
import time

import openai
import pytest

from keel.config import CacheConfig
from keel.engine.llm_engine import LLMEngine
from keel.finetune.jobs import FineTuning, ServedModel
from keel.server import create_app
from tests.finetune.conftest import fact_examples, jsonl, wait_for
from tests.server.conftest import LiveServer

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def ft_server(ft_ckpt, tmp_path_factory):
    folder, _ = ft_ckpt
    engine = LLMEngine(folder, dtype="float32", cache=CacheConfig(block_size=4, num_blocks=512),
                       enable_lora=True, max_loras=4, max_lora_rank=16)
    base = ServedModel(MODEL, folder, engine.max_model_len, engine.tokenizer, max_rank=16)
    ft = FineTuning(base, str(tmp_path_factory.mktemp("data")), register=engine.adapters.add, threads=1, poll_s=0.05)
    with LiveServer(create_app(engine, served_model_name=MODEL, fine_tuning=ft)) as s:
        yield s


@pytest.fixture(scope="module")
def client(ft_server) -> openai.OpenAI:
    return ft_server.client()


def upload(client, records, name="train.jsonl", purpose="fine-tune"):
    return client.files.create(file=(name, io.BytesIO(jsonl(records))), purpose=purpose)


def wait_status(client, job_id, statuses, timeout=120):
    job = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in statuses and j, timeout, 0.1)
    assert job, f"job {job_id} did not reach {statuses}: {client.fine_tuning.jobs.retrieve(job_id)}"
    return job


def test_files_round_trip(client):
    records = fact_examples(5)
    f = upload(client, records)
    assert f.object == "file" and f.purpose == "fine-tune" and f.filename == "train.jsonl"
    assert f.bytes == len(jsonl(records)) and f.status == "processed"
    assert client.files.retrieve(f.id).id == f.id
    assert client.files.content(f.id).read() == jsonl(records)
    g = upload(client, [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}],
               "batch.jsonl", "batch")
    listed = client.files.list()
    ids = [x.id for x in listed.data]
    assert ids.index(g.id) < ids.index(f.id)  # newest first
    assert [x.id for x in client.files.list(purpose="batch").data] == [g.id]
    page = client.files.list(limit=1, order="asc")
    assert page.has_more and len(page.data) == 1
    after = client.files.list(after=page.data[0].id, order="asc", limit=100).data
    assert page.data[0].id not in [x.id for x in after]
    deleted = client.files.delete(f.id)
    assert deleted.deleted and deleted.id == f.id
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(f.id)
    with pytest.raises(openai.NotFoundError):
        client.files.content(f.id)


@pytest.mark.parametrize("body, words", [
    (b'{"messages": [{"role": "user", "content": "t1"}, {"role": "assistant", "content": "t2"}]}\n{not json\n',
     ["line 2", "not valid JSON"]),
    (b'{"messages": [{"role": "user", "content": "t1"}]}\n', ["line 1", "no assistant message"]),
    (b'{"messages": [{"role": "robot", "content": "t1"}]}\n', ["line 1", "role"]),
    (b'{"prompt": "a", "completion": "b"}\n', ["line 1", "unknown key"]),
    (b"", ["no records"]),
    (b"\xff\xfe", ["UTF-8"]),
])
def test_bad_training_files_are_refused_with_the_line(client, body, words):
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("bad.jsonl", io.BytesIO(body)), purpose="fine-tune")
    msg = e.value.body["message"]
    assert all(w in msg for w in words), msg
    assert e.value.body["param"] == "file"


def test_unsupported_purpose(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.files.create(file=("x.jsonl", io.BytesIO(jsonl(fact_examples(1)))), purpose="vision")
    assert e.value.body["param"] == "purpose"


def test_bad_job_requests(client):
    good = upload(client, fact_examples(4)).id
    batch = upload(client, [{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}],
                   "b.jsonl", "batch").id
    gone = upload(client, fact_examples(2)).id
    client.files.delete(gone)
    cases = [
        (dict(model="no-such-model", training_file=good), "model"),
        (dict(model=MODEL, training_file=gone), "training_file"),
        (dict(model=MODEL, training_file=batch), "training_file"),
        (dict(model=MODEL, training_file=good, validation_file="file-nope"), "validation_file"),
        (dict(model=MODEL, training_file=good, method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}),
         "method.supervised.hyperparameters.n_epochs"),
        (dict(model=MODEL, training_file=good, method={"type": "supervised", "supervised": {"hyperparameters":
                                                        {"learning_rate_multiplier": -1}}}),
         "method.supervised.hyperparameters.learning_rate_multiplier"),
        (dict(model=MODEL, training_file=good, extra_body={"lora": {"r": 64}}), "lora.r"),
        (dict(model=MODEL, training_file=good, suffix="has space"), "suffix"),
    ]
    for kwargs, param in cases:
        with pytest.raises((openai.BadRequestError, openai.NotFoundError)) as e:
            client.fine_tuning.jobs.create(**kwargs)
        assert e.value.body["param"] == param, (kwargs, e.value.body)
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-nope")


def test_a_job_trains_an_adapter_that_is_served_at_once(client, ft_server):
    train = upload(client, fact_examples(24)).id
    valid = upload(client, fact_examples(6, seed=1)).id
    job = client.fine_tuning.jobs.create(
        model=MODEL, training_file=train, validation_file=valid, suffix="facts", seed=11,
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 8, "batch_size": 4,
                                                                         "learning_rate_multiplier": 50}}},
        extra_body={"lora": {"r": 8}})
    assert job.status in ("validating_files", "queued") and job.fine_tuned_model is None
    assert job.hyperparameters.n_epochs == 8 and job.seed == 11
    done = wait_status(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model.startswith(f"ft:{MODEL}:keel:facts:") and done.trained_tokens > 0
    assert done.finished_at >= done.created_at

    events = client.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    assert len(metrics) == 48 and metrics[0].data["step"] == 48  # newest first
    assert metrics[0].data["train_loss"] < 0.1 * metrics[-1].data["train_loss"]
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed" and messages[-1] == "Validating training file"
    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [42, 36, 30, 24, 18, 12, 6]  # one per epoch
    assert all("valid_loss" in c.metrics.model_dump() or "valid_loss" in (c.metrics.model_extra or {}) for c in ckpts)
    assert ckpts[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-42"

    assert done.fine_tuned_model in [m.id for m in client.models.list().data]
    right = 0
    for k in range(8):
        msgs = [{"role": "system", "content": "t9"}, {"role": "user", "content": f"t{20 + k}"}]
        out = client.chat.completions.create(model=done.fine_tuned_model, messages=msgs, max_tokens=2, temperature=0)
        base = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2, temperature=0)
        right += out.choices[0].message.content.strip() == f"t{100 + k} t{150 + k}"
        assert base.choices[0].message.content.strip() != f"t{100 + k} t{150 + k}"
    assert right == 8
    assert job.id in [j.id for j in client.fine_tuning.jobs.list().data]
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


def test_cancel_stops_a_running_job(client, ft_server):
    train = upload(client, fact_examples(24)).id
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train,
                                         method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 50, "batch_size": 1}}})
    wait_status(client, job.id, ("running",))
    t = time.monotonic()
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    ft = ft_server.state.fine_tuning
    assert wait_for(lambda: ft._proc is None, 10), "the worker is still running"
    assert time.monotonic() - t < 10
    time.sleep(0.5)
    final = client.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None


def test_a_failing_job_ends_failed_and_the_server_keeps_serving(client):
    # every answer starts after token 16: cut at max_seq_length 16, an example has nothing to learn
    long = [{"messages": [{"role": "user", "content": " ".join(f"t{30 + i}" for i in range(20))},
                          {"role": "assistant", "content": "t100"}]}]
    train = upload(client, long).id
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train,
                                         method={"type": "supervised", "supervised": {"hyperparameters": {"max_seq_length": 16}}})
    done = wait_status(client, job.id, ("succeeded", "failed", "cancelled"), timeout=30)
    assert done.status == "failed" and done.error.code == "invalid_training_file"
    assert "line 1" in done.error.message and "16 tokens" in done.error.message
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "t5"}], max_tokens=2)
    assert out.choices[0].finish_reason in ("length", "stop")


def test_training_data_survives_the_upload_being_deleted(client, ft_server):
    train = upload(client, fact_examples(4))
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=train.id,
                                         method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1}}})
    client.files.delete(train.id)
    done = wait_status(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    folder = ft_server.state.fine_tuning.job_folder(job.id)
    with open(os.path.join(folder, "training.jsonl"), "rb") as f:
        assert f.read() == jsonl(fact_examples(4))
    cfg = json.load(open(os.path.join(folder, "adapter", "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["base_model_name_or_path"] == MODEL


def test_uploads_have_their_own_size_limit(ft_ckpt, tmp_path):
    """A training file may be larger than any other request body (OpenAI allows 512 MB per file)."""
    from keel.server.limits import ServerLimits
    folder, _ = ft_ckpt
    engine = LLMEngine(folder, dtype="float32", cache=CacheConfig(block_size=4, num_blocks=64))
    ft = FineTuning(ServedModel(MODEL, folder, engine.max_model_len, engine.tokenizer), str(tmp_path / "d"))
    limits = ServerLimits(max_request_bytes=4000, max_upload_bytes=40000)
    with LiveServer(create_app(engine, served_model_name=MODEL, fine_tuning=ft, limits=limits)) as s:
        client = s.client()
        big = fact_examples(60)  # ~9 KB: over the request limit, under the upload limit
        assert len(jsonl(big)) > 4000
        assert upload(client, big).bytes == len(jsonl(big))
        before = len(client.files.list().data)
        assert _refused(lambda: upload(client, fact_examples(400)))  # over the upload limit too
        assert _refused(lambda: client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "t5 " * 2000}], max_tokens=1))
        assert len(client.files.list().data) == before  # nothing half-stored; the server still answers


def _refused(call) -> bool:
    """A 413, or the connection closed by the server's 413 while the client was still sending its body
    (the server answers as soon as the body passes the limit; which one the client sees is a race)."""
    try:
        call()
    except openai.APIStatusError as e:
        return e.status_code == 413
    except openai.APIConnectionError:
        return True
    return False
