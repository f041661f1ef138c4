"""POST /v1/responses through the official openai client: text, streaming events, previous_response_id, stored responses (also across a restart),
input items, and the 400s for what keel does not do. Shapes checked against OpenAI's spec. (Tools and structured
output need a real tokenizer: tests/structured/test_responses.py, on the built-in model.)"""

from __future__ import annotations

import json

import openai
import pytest

from keel.server import create_app
from keel.store import ResponseStore
from tests.server.conftest import MODEL, LiveServer, tiny_engine

@pytest.fixture(scope="module")
def live(tiny_ckpt, tmp_path_factory):
    db = str(tmp_path_factory.mktemp("state") / "state.sqlite3")
    with LiveServer(create_app(tiny_engine(tiny_ckpt), served_model_name=MODEL, response_store=ResponseStore(db))) as s:
        s.db = db
        yield s


def test_text_response_matches_the_spec_and_is_stored(live, schemas):
    client = live.client()
    r = client.responses.create(model=MODEL, input="t10 t11 t12", max_output_tokens=6, temperature=0,
                                instructions="t20 t21")
    with live.http() as h:  # the JSON as sent (the SDK's model fills in fields it did not get)
        raw = h.post("/v1/responses", json={"model": MODEL, "input": "t10 t11 t12", "max_output_tokens": 6})
        schemas.validate("Response", raw.json())
    assert r.status in ("completed", "incomplete") and r.output_text
    assert r.output[0].type == "message" and r.output[0].content[0].type == "output_text"
    assert r.usage.output_tokens <= 6 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    # the same words as chat completions would give for the same conversation
    chat = client.chat.completions.create(model=MODEL, max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "t20 t21"}, {"role": "user", "content": "t10 t11 t12"}])
    assert r.output_text == chat.choices[0].message.content
    got = client.responses.retrieve(r.id)
    assert got.id == r.id and got.output_text == r.output_text
    items = client.responses.input_items.list(r.id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "t10 t11 t12"


def test_previous_response_id_continues_the_conversation(live):
    client = live.client()
    first = client.responses.create(model=MODEL, input="t10 t11", max_output_tokens=4, temperature=0)
    second = client.responses.create(model=MODEL, input="t12", max_output_tokens=4, temperature=0,
                                     previous_response_id=first.id)
    assert second.previous_response_id == first.id
    chat = client.chat.completions.create(model=MODEL, max_tokens=4, temperature=0, messages=[
        {"role": "user", "content": "t10 t11"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "t12"}])
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="t1", previous_response_id="resp_nope")


def test_streaming_events_build_the_same_response(live, schemas):
    client = live.client()
    kw = dict(model=MODEL, input="t10 t11 t12", max_output_tokens=6, temperature=0)
    whole = client.responses.create(**kw)
    types, text, last = [], "", None
    for event in client.responses.create(**kw, stream=True):
        types.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        last = event
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert types[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert last.type in ("response.completed", "response.incomplete")
    assert text == whole.output_text == last.response.output_text
    with live.http() as h:
        raw = h.post("/v1/responses", json={**kw, "stream": True}).text
    events = [json.loads(line[6:]) for line in raw.splitlines() if line.startswith("data: ")]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    for e in events:
        name = {"response.created": "ResponseCreatedEvent", "response.output_text.delta": "ResponseTextDeltaEvent",
                "response.output_item.added": "ResponseOutputItemAddedEvent",
                "response.content_part.added": "ResponseContentPartAddedEvent",
                "response.completed": "ResponseCompletedEvent"}.get(e["type"])
        if name:
            schemas.validate(name, e)
    assert client.responses.retrieve(last.response.id).output_text == text


@pytest.mark.parametrize("kw, param", [
    (dict(tools=[{"type": "web_search"}]), "tools[0].type"),
    (dict(tools=[{"type": "file_search", "vector_store_ids": ["v"]}]), "tools[0].type"),
    (dict(background=True), "background"),
    (dict(input=[{"type": "reasoning", "summary": []}]), "input[0].type"),
    (dict(input=[{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]), "input[0].content[0]"),
    (dict(tool_choice={"type": "web_search"}), "tool_choice"),
])
def test_what_keel_does_not_do_is_a_400(live, kw, param):
    with pytest.raises(openai.BadRequestError) as e:
        live.client().responses.create(**{"model": MODEL, "input": "t10", **kw})
    assert e.value.body["param"] == param


def test_delete_then_404_and_stored_responses_survive_a_restart(live, tiny_ckpt):
    client = live.client()
    kept = client.responses.create(model=MODEL, input="t10", max_output_tokens=3)
    gone = client.responses.create(model=MODEL, input="t11", max_output_tokens=3)
    unstored = client.responses.create(model=MODEL, input="t12", max_output_tokens=3, store=False)
    client.responses.delete(gone.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.delete(gone.id)
    for rid in (gone.id, unstored.id):
        with pytest.raises(openai.NotFoundError):
            client.responses.retrieve(rid)
    restarted = create_app(tiny_engine(tiny_ckpt), served_model_name=MODEL, response_store=ResponseStore(live.db))
    with LiveServer(restarted) as again:
        c = again.client()
        assert c.responses.retrieve(kept.id).output_text == kept.output_text
        follow = c.responses.create(model=MODEL, input="t13", previous_response_id=kept.id, max_output_tokens=3)
        assert follow.usage.input_tokens > kept.usage.input_tokens


def test_top_logprobs_in_the_output_text_and_its_deltas(live):
    client = live.client()
    kw = dict(model=MODEL, input="t10 t11", max_output_tokens=5, temperature=0, top_logprobs=2)
    whole = client.responses.create(**kw)
    lps = whole.output[0].content[0].logprobs
    assert len(lps) == whole.usage.output_tokens and all(len(lp.top_logprobs) == 2 for lp in lps)
    # the tiny WordLevel tokenizer decodes tokens one by one without their spaces
    assert "".join(lp.token for lp in lps) == whole.output_text.replace(" ", "")
    streamed = [lp for e in client.responses.create(**kw, stream=True) if e.type == "response.output_text.delta"
                for lp in e.logprobs]
    assert [lp.token for lp in streamed] == [lp.token for lp in lps]


def test_an_unusable_state_database_is_a_clean_error(tmp_path, tiny_ckpt, capsys):
    from keel.cli import main
    from keel.errors import KeelError
    not_sqlite = tmp_path / "junk.sqlite3"
    not_sqlite.write_bytes(b"this is not a database" * 100)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for path in (str(not_sqlite), str(blocker / "below" / "state.sqlite3")):
        with pytest.raises(KeelError, match="cannot be opened"):
            ResponseStore(path)
        assert main(["serve", tiny_ckpt, "--port", "0", "--state-db", path, "--no-embedding-model"]) == 2
        assert "state database" in capsys.readouterr().err
