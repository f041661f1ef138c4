"""The endpoints through the official openai client (sync and async, streamed and not), every
response checked against OpenAI's published schemas."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
from types import SimpleNamespace

import openai
import pytest

from keel.quant import QuantConfig
from keel.server.fingerprint import system_fingerprint
from keel.server import create_app
from tests.server.conftest import MODEL, LiveServer, chat_body, sse_events, tiny_engine

MESSAGES = [{"role": "system", "content": "t20 t21"}, {"role": "user", "content": "t10 t11 t12"}]
GREEDY = dict(temperature=0, max_tokens=12, extra_body={"ignore_eos": True})


def collect_chat_stream(stream, schemas) -> tuple[dict[int, str], dict[int, str], list]:
    """Texts and finish reasons per choice of a streamed chat, checking the chunk protocol."""
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    chunks = list(stream)
    for chunk in chunks:
        schemas.validate("CreateChatCompletionStreamResponse", chunk.to_dict(mode="json"))
        assert chunk.object == "chat.completion.chunk" and re.fullmatch(r"fp_[0-9a-f]{10}", chunk.system_fingerprint)
        for c in chunk.choices:
            if c.index not in texts:  # the role comes in the first delta of each choice
                assert c.delta.role == "assistant"
                texts[c.index] = ""
            assert c.index not in reasons, "a chunk after the choice's finish_reason"
            texts[c.index] += c.delta.content or ""
            if c.finish_reason is not None:
                reasons[c.index] = c.finish_reason
    return texts, reasons, chunks


def test_models_and_health(server, client, schemas):
    with server.http() as http:
        raw = http.get("/v1/models")
        schemas.validate("ListModelsResponse", raw.json())
        assert http.get("/health").status_code == 200
        assert http.get("/v1/models").json() == raw.json()  # "created" is fixed, not the clock
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL] and models.data[0].owned_by == "keel"
    assert client.models.retrieve(MODEL).id == MODEL
    card = models.data[0].model_dump()  # keel's own fields beside OpenAI's: what the model is and how it is held
    assert card["architecture"] == "LlamaForCausalLM" and card["quantization"] is None
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"


def test_system_fingerprint_follows_the_files_not_the_clock(server, tiny_ckpt, tmp_path):
    engine = server.state.engine
    fp = server.state.fingerprint
    assert re.fullmatch(r"fp_[0-9a-f]{10}", fp)

    def fingerprint(folder, dtype=engine.dtype, quantization=None):
        files = [f.replace(tiny_ckpt, folder) for f in engine.checkpoint_files]
        return system_fingerprint(SimpleNamespace(checkpoint_files=files, model_path=folder, dtype=dtype,
                                                  device=engine.device, quantization=quantization,
                                                  backend=backend))
    backend = engine.backend
    copy = str(tmp_path / "copy")
    shutil.copytree(tiny_ckpt, copy)  # new modification times, same bytes
    assert fingerprint(tiny_ckpt) == fingerprint(copy) == fp
    assert fingerprint(copy, dtype="bfloat16") != fp
    from keel.kernels.backend import Backend
    backend = Backend(engine.device, engine.dtype, None)  # other kernels compute the same files: another id
    assert fingerprint(copy) != fp
    backend = engine.backend
    int8, int4 = (fingerprint(copy, quantization=QuantConfig(m)) for m in ("int8", "int4"))
    assert len({fp, int8, int4, fingerprint(copy, quantization=QuantConfig("int4", 64))}) == 4
    config = json.loads((tmp_path / "copy" / "tokenizer_config.json").read_text())
    config["chat_template"] += " "
    (tmp_path / "copy" / "tokenizer_config.json").write_text(json.dumps(config))
    assert fingerprint(copy) != fp


def test_chat(server, client, schemas):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, **GREEDY)
    schemas.validate("CreateChatCompletionResponse", raw.http_response.json())
    r = raw.parse()
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.system_fingerprint == server.state.fingerprint
    (choice,) = r.choices
    assert choice.finish_reason == "length" and choice.message.role == "assistant" and choice.message.content
    prompt = server.state.engine.tokenizer.encode_chat(MESSAGES)
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == 12
    assert r.usage.total_tokens == len(prompt) + 12

    # developer means system to templates that predate it; list-of-text-parts content is joined
    r2 = client.chat.completions.create(
        model=MODEL, **GREEDY, messages=[{"role": "developer", "content": "t20 t21"},
                                         {"role": "user", "content": [{"type": "text", "text": "t10 t11 t12"}]}])
    assert r2.choices[0].message.content == choice.message.content


def test_chat_stream_equals_non_streamed(client, schemas):
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY)
    texts, reasons, chunks = collect_chat_stream(stream, schemas)
    assert texts == {0: plain.choices[0].message.content} and reasons == {0: "length"}
    *body, last = chunks
    assert last.choices == [] and last.usage.model_dump() == plain.usage.model_dump()
    assert all(c.usage is None and "usage" in c.to_dict() for c in body)
    assert len({c.id for c in chunks}) == 1


def test_chat_async_streamed_and_not(server, schemas):
    async def main():
        async with server.async_client() as aclient:
            plain = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
            stream = await aclient.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True, **GREEDY)
            chunks = [c async for c in stream]
            return plain, chunks
    plain, chunks = asyncio.run(main())
    schemas.validate("CreateChatCompletionResponse", plain.to_dict(mode="json"))
    texts, reasons, _ = collect_chat_stream(iter(chunks), schemas)
    assert texts[0] == plain.choices[0].message.content and reasons == {0: "length"}
    assert all("usage" not in c.to_dict() for c in chunks)  # only with include_usage


def test_seeded_sampling_repeats_and_n(server, client, schemas):
    kw = dict(model=MODEL, messages=MESSAGES, temperature=1.0, top_p=0.95, max_tokens=10, seed=1234)
    a, b = (client.chat.completions.create(**kw) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content

    three = client.chat.completions.with_raw_response.create(**{**kw, "n": 3})
    schemas.validate("CreateChatCompletionResponse", three.http_response.json())
    three = three.parse()
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.message.content for c in three.choices}) > 1  # each choice its own random stream
    # usage counts every generated token of every choice, the end-of-sequence token that ended one included
    tok = server.state.engine.tokenizer
    generated = sum(len(tok.encode(c.message.content, add_special_tokens=False)) + (c.finish_reason == "stop")
                    for c in three.choices)
    assert three.usage.completion_tokens == generated

    texts, reasons, chunks = collect_chat_stream(client.chat.completions.create(**{**kw, "n": 3}, stream=True), schemas)
    assert texts == {c.index: c.message.content for c in three.choices}
    assert reasons == {c.index: c.finish_reason for c in three.choices}
    assert len({c.choices[0].index for c in chunks[3:6]}) > 1, "choices should interleave, not run one by one"


def test_chat_logprobs_and_stop(client, schemas):
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=MESSAGES, logprobs=True,
                                                           top_logprobs=3, **GREEDY)
    schemas.validate("CreateChatCompletionResponse", raw.http_response.json())
    choice = raw.parse().choices[0]
    content = choice.logprobs.content
    assert len(content) == 12 and all(len(t.top_logprobs) == 3 for t in content)
    assert "".join(t.token for t in content).replace(" ", "") == choice.message.content.replace(" ", "")
    # greedy: the chosen token is the most likely one
    assert all(t.top_logprobs[0].token == t.token and t.logprob <= 0 for t in content)

    words = choice.message.content.split()
    stop = words[3]
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, stop=[stop, "t999"], **GREEDY)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and stop not in text
    assert choice.message.content.startswith(text)


def test_completions(server, client, schemas):
    raw = client.completions.with_raw_response.create(model=MODEL, prompt="t40 t41 t42", **GREEDY)
    schemas.validate("CreateCompletionResponse", raw.http_response.json())
    r = raw.parse()
    assert r.object == "text_completion" and r.system_fingerprint == server.state.fingerprint
    ids = server.state.engine.tokenizer.encode("t40 t41 t42")
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 12
    text = r.choices[0].text

    # the same prompt as token ids, in a batch of prompts, with n=2, echo
    batch = client.completions.create(model=MODEL, prompt=[ids, [50, 51]], n=2, echo=True, **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]
    echo = server.state.engine.tokenizer.decode(ids, skip_special_tokens=False)
    assert batch.choices[0].text == batch.choices[1].text == echo + text
    assert batch.usage.prompt_tokens == len(ids) + 2 and batch.usage.completion_tokens == 4 * 12

    lp = client.completions.with_raw_response.create(model=MODEL, prompt="t40 t41 t42", logprobs=2, **GREEDY)
    schemas.validate("CreateCompletionResponse", lp.http_response.json())
    logprobs = lp.parse().choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == 12
    assert all(len(top) >= 2 for top in logprobs.top_logprobs)
    for token, offset in zip(logprobs.tokens, logprobs.text_offset):
        assert text[offset:].lstrip().startswith(token)


def test_completions_streamed_sync_and_async(server, client, schemas):
    plain = client.completions.create(model=MODEL, prompt=["t40 t41 t42", "t7 t8"], **GREEDY)

    def check(chunks):
        texts: dict[int, str] = {}
        reasons: dict[int, str] = {}
        for chunk in chunks[:-1]:
            schemas.validate("CompletionStreamChunk", chunk.to_dict(mode="json"))
            for c in chunk.choices:
                assert c.index not in reasons
                texts[c.index] = texts.get(c.index, "") + c.text
                if c.finish_reason:
                    reasons[c.index] = c.finish_reason
        assert texts == {c.index: c.text for c in plain.choices}
        assert reasons == {0: "length", 1: "length"}
        assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == plain.usage.model_dump()

    kw = dict(model=MODEL, prompt=["t40 t41 t42", "t7 t8"], stream=True, stream_options={"include_usage": True},
              **GREEDY)
    check(list(client.completions.create(**kw)))

    async def main():
        async with server.async_client() as aclient:
            return [c async for c in await aclient.completions.create(**kw)]
    check(asyncio.run(main()))


def test_raw_sse_framing(server):
    with server.http() as http:
        r = http.post("/v1/chat/completions", json=chat_body(stream=True, n=2))
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
        chunks = [json.loads(e) for e in events[:-1]]
        assert {c["choices"][0]["index"] for c in chunks} == {0, 1}
        assert all("usage" not in c for c in chunks)

        r = http.post("/v1/completions", json={"model": MODEL, "prompt": "t5", "max_tokens": 3, "stream": True})
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and all(json.loads(e)["object"] == "text_completion" for e in events[:-1])

        # `curl -d` sends JSON as a form; it is read as JSON all the same
        r = http.post("/v1/chat/completions", content=json.dumps(chat_body()),
                      headers={"content-type": "application/x-www-form-urlencoded"})
        assert r.status_code == 200 and r.json()["object"] == "chat.completion"


def test_metrics(server, client):
    before = server.metrics()
    client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    after = server.wait_idle()
    for name in ("keel_requests_running", "keel_requests_waiting", "keel_kv_cache_usage_ratio",
                 "keel_time_to_first_token_seconds_count", "keel_time_per_output_token_seconds_count",
                 'keel_time_per_output_token_seconds_bucket{le="+Inf"}'):
        assert name in after, name
    assert after["keel_generation_tokens_total"] - before["keel_generation_tokens_total"] == 12
    assert after["keel_prompt_tokens_total"] > before["keel_prompt_tokens_total"]
    assert after['keel_requests_total{finish_reason="length"}'] == before['keel_requests_total{finish_reason="length"}'] + 1
    assert after["keel_time_to_first_token_seconds_count"] == before["keel_time_to_first_token_seconds_count"] + 1
    with server.http() as http:
        text = http.get("/metrics").text
    assert "# TYPE keel_time_to_first_token_seconds histogram" in text
    assert "# TYPE keel_prompt_tokens_total counter" in text
    if os.path.exists("/proc/self/stat"):  # the process's own metrics (prometheus_client reads them on Linux)
        assert "process_resident_memory_bytes" in text and "process_cpu_seconds_total" in text
    # which code computes each layer, as chosen at start
    backend = server.state.engine.backend
    kinds = [line for line in text.splitlines() if line.startswith("keel_kernel_info{")]
    assert len(kinds) == len(backend.table()) and all(float(line.rsplit(" ", 1)[1]) == 1 for line in kinds)
    assert any('layer="attention"' in line for line in kinds)
    assert all(f'isa="{backend.isa or "none"}"' in line and 'batch_invariant="true"' in line for line in kinds)


@pytest.mark.parametrize("default, expected", [(5, 5), (None, "context")])
def test_requests_without_max_tokens_get_the_server_default(tiny_ckpt, default, expected):
    app = create_app(tiny_engine(tiny_ckpt), served_model_name=MODEL, default_max_tokens=default)
    with LiveServer(app) as s, s.http() as h:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "t10 t11"}], "ignore_eos": True}
        r = h.post("/v1/chat/completions", json=body).json()
        prompt = r["usage"]["prompt_tokens"]
        want = s.state.engine.max_model_len - prompt if expected == "context" else expected
        assert r["usage"]["completion_tokens"] == want and r["choices"][0]["finish_reason"] == "length"
        r = h.post("/v1/completions", json={"model": MODEL, "prompt": "t10", "ignore_eos": True}).json()
        assert r["usage"]["completion_tokens"] == 16  # completions' own default, as OpenAI's


def test_request_timeout_ends_generation_as_length(tiny_ckpt):
    app = create_app(tiny_engine(tiny_ckpt), served_model_name=MODEL, request_timeout_s=0.001)
    with LiveServer(app) as s, s.http() as h:
        body = {"model": MODEL, "prompt": "t10", "max_tokens": 200, "ignore_eos": True}
        r = h.post("/v1/completions", json=body).json()
        assert r["choices"][0]["finish_reason"] == "length" and r["usage"]["completion_tokens"] < 200
        r = h.post("/v1/completions", json={**body, "stream": True})
        events = sse_events(r.text)
        assert events[-1] == "[DONE]" and '"finish_reason":"length"' in events[-2]
        s.wait_idle()
