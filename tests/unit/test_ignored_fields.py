"""The request fields keel accepts and ignores: declared from one tuple, each one documented."""

from __future__ import annotations


def test_every_ignored_field_is_declared_once_and_documented():
    import re

    import keel.server
    from keel.server.protocol import HOSTED_ONLY_FIELDS, ChatCompletionRequest, CompletionRequest
    doc = re.sub(r"\s+", " ", keel.server.__doc__)
    listed = doc.split("HOSTED_ONLY_FIELDS):", 1)[1].split(";", 1)[0]
    assert sorted(f.strip(" .") for f in listed.split(",")) == sorted(HOSTED_ONLY_FIELDS)
    for model in (ChatCompletionRequest, CompletionRequest):
        assert set(HOSTED_ONLY_FIELDS) <= set(model.model_fields)
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]} if model is ChatCompletionRequest \
            else {"model": "m", "prompt": "hi"}
        model.model_validate({**body, **{f: "x" for f in HOSTED_ONLY_FIELDS}})  # accepted
