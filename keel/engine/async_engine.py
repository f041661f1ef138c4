"""One engine loop serving many concurrent callers, and the only way the server reaches the engine.

The engine is not thread-safe, so one thread owns it: between steps it takes new requests and aborts
from a command queue, then runs a step and hands each output to its caller's asyncio queue. Callers
on the event loop never block it, and concurrent requests land in the same batches. Everything else a
caller may need is here too and safe from any thread: the engine's fixed facts (`info`), a snapshot
of its load published by the engine thread (`stats`), its adapters (`adapters`) and grammar checks.

Nothing one request does stops the loop. The engine ends a request whose own processing fails, and a
step that fails as a whole ends that step's requests (LLMEngine.step). Should anything still escape a
step, the loop ends every request in flight with the error and goes on (`num_restarts` counts it);
only an exit of the thread itself (`dead`) makes the server unable to serve.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator

from keel.engine.llm_engine import LLMEngine
from keel.errors import KeelError
from keel.outputs import RequestOutput
from keel.sampling_params import SamplingParams

log = logging.getLogger("keel.engine")


class QueueFullError(KeelError):
    """Too many requests are waiting; the caller should retry later."""


class EngineDeadError(KeelError):
    """The engine loop stopped after an internal error."""


@dataclass(frozen=True)
class EngineInfo:
    """What does not change while the engine runs."""
    model_name: str
    max_model_len: int
    tokenizer: object  # keel.tokenizer.Tokenizer (thread-safe: encode/decode hold no state)
    backend: object  # keel.kernels.backend.Backend: which code computes each layer, chosen at start
    architecture: str = ""  # the checkpoint's architecture, e.g. "Phi3ForCausalLM"
    quantization: str | None = None  # how the weights are held when not as in the checkpoint: "int8", "int4", "gguf"


@dataclass(frozen=True)
class EngineStats:
    """The engine's load, as of its last step (or the last commands it took)."""
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_steps: int = 0
    max_running_seen: int = 0
    num_restarts: int = 0


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    arrival: float = field(default_factory=time.monotonic)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 256, num_threads: int | None = None) -> None:
        """num_threads: torch's thread count, set from the engine thread before its first step (see
        keel.serve_cli._serve, which loads the model with one thread so that only this thread starts an
        OpenMP pool)."""
        self.engine = engine
        quant = engine.quantization
        self.info = EngineInfo(engine.model_name, engine.max_model_len, engine.tokenizer, engine.backend,
                               engine.model_config.architecture, None if quant is None else quant.method)
        self.adapters = engine.adapters  # keel.engine.adapters.Adapters: thread-safe on its own
        self.num_threads = num_threads
        self.max_waiting = max_waiting
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._pending_adds = 0
        self._lock = threading.Lock()  # guards _pending_adds
        self.dead: BaseException | None = None
        self.num_restarts = 0  # failures that escaped a step and ended every request in flight
        self.num_steps = 0
        self.max_running_seen = 0
        self._stats = EngineStats()
        self._thread = threading.Thread(target=self._loop, name="keel-engine", daemon=True)
        self._thread.start()

    # -- called from the event loop --------------------------------------------------------
    def stats(self) -> EngineStats:
        s = self._stats
        return EngineStats(s.num_running, s.num_waiting + self._pending_adds, s.kv_cache_usage, s.num_steps,
                           s.max_running_seen, self.num_restarts)

    @property
    def num_running(self) -> int:
        return self._stats.num_running

    @property
    def num_waiting(self) -> int:
        return self._stats.num_waiting + self._pending_adds

    def check_structured(self, params: SamplingParams) -> None:
        """Compile the grammar these parameters ask for (cached for the engine thread): a schema that
        cannot be enforced raises StructuredOutputError here, before the request is queued."""
        self.engine.structured.guide_for(params)

    def check_grammar(self, grammar: str) -> None:
        """Compile a grammar text (keel.engine.guided) without a request: StructuredOutputError if it cannot be used."""
        self.engine.structured.compile_text(grammar)

    async def generate(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                       adapter_id: int | None = None, adapter: str | None = None) -> AsyncIterator[RequestOutput]:
        """Yields outputs (with deltas) until the request finishes. Leaving the iteration early (a client
        that disconnected) aborts the request and frees its KV blocks at the next step.
        adapter: a registered LoRA adapter's name; LoRANotFoundError / LoRAError before any output."""
        if self.dead is not None:
            raise EngineDeadError(f"the engine stopped: {self.dead}")
        if adapter is not None:
            # Validation reads the adapter's files: on a worker thread, so the engine loop never waits on it.
            adapter_id = await asyncio.get_running_loop().run_in_executor(None, self.adapters.validate, adapter)
        with self._lock:
            if self.num_waiting >= self.max_waiting:
                raise QueueFullError(f"{self.num_waiting} requests are waiting (limit {self.max_waiting})")
            self._pending_adds += 1
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(("add", request_id, prompt, params, adapter_id, stream, fut))
        finished = False
        try:
            # Inside the try: a caller cancelled while the engine takes the request still aborts it.
            await asyncio.wrap_future(fut)  # raises the engine's validation error, if any
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):  # the loop failed around this request
                    finished = True
                    raise item
                if item.error is not None:  # ended by the engine, not by the model: the caller gets the reason
                    finished = item.finished
                    raise item.error
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def expire_all(self) -> None:
        """expire() every request in flight (a server asked to stop now)."""
        self._commands.put(("expire_all",))

    def expire(self, request_id: str) -> None:
        """End a request as if it had reached max_tokens (a server-side time limit): its caller gets
        the final output, finish_reason "length"."""
        self._commands.put(("expire", request_id))

    def shutdown(self) -> None:
        self._commands.put(("stop",))
        self._thread.join(timeout=10)

    # -- the engine thread -----------------------------------------------------------------
    def _handle(self, cmd) -> bool:
        kind = cmd[0]
        if kind == "stop":
            return False
        if kind == "abort":
            self.engine.abort_request(cmd[1])
            stream = self._streams.pop(cmd[1], None)
            del stream
        elif kind in ("expire", "expire_all"):
            for rid in [cmd[1]] if kind == "expire" else list(self.engine.groups):
                out = self.engine.expire_request(rid)
                stream = self._streams.pop(rid, None) if out is not None else None
                if stream is not None:
                    self._deliver(stream, out)
        elif kind == "add":
            _, rid, prompt, params, adapter_id, stream, fut = cmd
            with self._lock:
                self._pending_adds -= 1
            if not fut.set_running_or_notify_cancel():
                return True  # the caller gave up before the engine got here
            try:
                self.engine.add_request(rid, prompt, params, adapter_id)
            except BaseException as e:  # validation errors go back to the caller, not up this thread
                fut.set_exception(e)
            else:
                self._streams[rid] = stream
                fut.set_result(None)
        return True

    def _loop(self) -> None:
        if self.num_threads:
            import torch
            torch.set_num_threads(self.num_threads)
        while True:
            try:
                self._run()
                return
            except Exception as e:  # escaped a step: end what is in flight, keep serving
                log.exception("engine loop failed; ending every request in flight and going on")
                self.num_restarts += 1
                try:
                    self._fail_in_flight(e)
                except BaseException as again:
                    self._die(again)
                    return
            except BaseException as e:  # SystemExit, KeyboardInterrupt: this thread cannot go on
                self._die(e)
                return

    def _run(self) -> None:
        while True:
            block = not self.engine.has_unfinished_requests()
            try:
                cmd = self._commands.get(block=block)
                if not self._handle(cmd):
                    return
                while True:  # drain everything that arrived, so it joins this step
                    if not self._handle(self._commands.get_nowait()):
                        return
            except queue.Empty:
                pass
            self._publish()
            if not self.engine.has_unfinished_requests():
                continue
            outputs = self.engine.step()
            self.num_steps += 1
            self._publish()
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                if not self._deliver(stream, out):  # the caller's event loop is gone
                    self._streams.pop(out.request_id, None)
                    self.engine.abort_request(out.request_id)

    def _publish(self) -> None:
        """Swap in a new stats snapshot (one reference assignment: readers on other threads see the old
        or the new one, never a mix)."""
        sched = self.engine.scheduler
        running = len(sched.running)
        self.max_running_seen = max(self.max_running_seen, running)
        self._stats = EngineStats(running, sched.num_waiting, self.engine.pool.usage, self.num_steps,
                                  self.max_running_seen, self.num_restarts)

    def _fail_in_flight(self, error: Exception) -> None:
        for out in self.engine.fail_all(error):
            stream = self._streams.pop(out.request_id, None)
            if stream is not None:
                self._deliver(stream, out)
        for stream in self._streams.values():  # not known to the engine any more
            self._deliver(stream, error)
        self._streams.clear()

    def _die(self, error: BaseException) -> None:
        log.critical("engine loop stopped: %r", error)
        self.dead = error
        dead = EngineDeadError(f"the engine stopped: {error!r}")
        for stream in self._streams.values():
            self._deliver(stream, dead)
        self._streams.clear()
        self._fail_pending(error)

    @staticmethod
    def _deliver(stream: _Stream, item) -> bool:
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
            return True
        except RuntimeError:  # "Event loop is closed"
            return False

    def _fail_pending(self, error: BaseException) -> None:
        """Answer every add still queued, so no caller waits forever on a dead engine."""
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            if cmd[0] == "add" and cmd[-1].set_running_or_notify_cancel():
                cmd[-1].set_exception(EngineDeadError(f"the engine stopped: {error}"))
