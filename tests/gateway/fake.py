"""A fake OpenAI-compatible backend whose behaviour a test sets: answer, fail with a status, break a
stream after a few chunks, or hang."""

from __future__ import annotations

import asyncio
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


class Fake:
    def __init__(self, label: str, models=("up-model",)) -> None:
        self.label, self.models = label, list(models)
        self.mode = "ok"  # ok | 500 | 429 | 400 | break | hang
        self.health_ok = True
        self.calls: list[dict] = []
        self.app = self._build()

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.get("/v1/models")
        async def models():
            await self._hang()
            if not self.health_ok:
                return JSONResponse({"error": "down"}, status_code=503)
            return {"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]}

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.calls.append(body)
            mode = self.mode
            if mode in ("500", "429", "400"):
                return JSONResponse({"error": {"message": f"{self.label} says {mode}", "type": "x", "code": mode}},
                                    status_code=int(mode))
            await self._hang()
            text = f"from {self.label}"
            if not body.get("stream"):
                return {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                        "system_fingerprint": f"fp-{self.label}",
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": text}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}}

            async def events():
                for i, word in enumerate(text.split()):
                    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": body["model"],
                             "choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]}
                    yield f"data: {json.dumps(chunk)}\n\n"
                    await asyncio.sleep(0.01)
                    if mode == "break" and i == 0:
                        raise RuntimeError("the backend dies mid-stream")
                yield "data: [DONE]\n\n"
            return StreamingResponse(events(), media_type="text/event-stream")

        return app

    async def _hang(self) -> None:
        """While mode is "hang": answer nothing (as a stopped process would), until the test moves on."""
        while self.mode == "hang":
            await asyncio.sleep(0.05)
