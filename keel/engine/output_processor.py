"""After sampling: each request's tokens become text, stop strings and grammars end requests,
logprobs get their token texts, and the `n` choices of one request come back as one RequestOutput."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Callable

from keel.engine.detokenizer import IncrementalDetokenizer
from keel.engine.request import Request
from keel.outputs import CompletionOutput, Logprob, RequestOutput

log = logging.getLogger("keel")


@dataclass
class Group:
    """One user request: n sequences sharing a prompt."""
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detoks: list[IncrementalDetokenizer]
    outputs: list[CompletionOutput]
    adapter_id: int | None = None


class OutputProcessor:
    def __init__(self, tokenizer, structured, finish: Callable[[str, str, object], None]) -> None:
        """structured: keel.engine.guided.GrammarBackend; finish(request_id, reason, stop_reason) ends a
        sequence in the scheduler (a stop string, a complete grammar)."""
        self.tokenizer, self.structured, self._finish = tokenizer, structured, finish
        self.groups: dict[str, Group] = {}
        self._child_to_group: dict[str, tuple[Group, int]] = {}

    def add(self, request_id: str, prompt: str | None, ids: list[int], children: list[Request],
            adapter_id: int | None) -> Group:
        detoks, outputs = [], []
        for i, child in enumerate(children):
            p = child.params
            detoks.append(IncrementalDetokenizer(self.tokenizer, ids, skip_special_tokens=p.skip_special_tokens,
                                                 stop=p.stop_list, include_stop_str_in_output=p.include_stop_str_in_output))
            outputs.append(CompletionOutput(i, "", [], logprobs=[] if p.logprobs is not None else None))
        group = Group(request_id, prompt, ids, children, detoks, outputs, adapter_id)
        self.groups[request_id] = group
        for i, child in enumerate(children):
            self._child_to_group[child.request_id] = (group, i)
        return group

    def group_of(self, child_id: str) -> Group | None:
        entry = self._child_to_group.get(child_id)
        return None if entry is None else entry[0]

    def drop(self, group: Group) -> None:
        self.groups.pop(group.request_id, None)
        for child in group.children:
            self._child_to_group.pop(child.request_id, None)

    # -- after a step ------------------------------------------------------------------------
    def process(self, updated: list[Request], out) -> list[tuple[Group, Exception | None]]:
        """Record the token each updated sequence sampled (out: RunnerOutput). Returns every group
        touched, with the error that ended it (its own sampling or processing failed) or None."""
        touched: dict[str, Group] = {}
        broken: dict[str, Exception] = {}
        for req in updated:
            group, i = self._child_to_group[req.request_id]
            error = out.errors.get(req.request_id)
            if error is None:
                try:
                    self._take_token(req, group, i, out)
                except Exception as e:  # detokenizing, stop strings, grammar: this request's own failure
                    log.exception("request %s failed after sampling", req.request_id)
                    error = e
            if error is not None:
                broken.setdefault(group.request_id, error)
            touched[group.request_id] = group
        return [(g, broken.get(rid)) for rid, g in touched.items()]

    def _take_token(self, req: Request, group: Group, i: int, out) -> None:
        tok = req.output_token_ids[-1]
        if req.guide is not None and not req.finished:
            self._advance_guide(req, tok)
        # A stop or end-of-sequence token ends the text without appearing in it (as in vLLM)
        hidden = req.finished and req.stop_reason == tok and not req.params.include_stop_str_in_output
        stop = None if hidden else group.detoks[i].update([tok])
        if stop is not None and not req.finished:
            self._finish(req.request_id, "stop", stop)
        elif stop is not None:
            req.finish_reason, req.stop_reason = "stop", stop
        o = group.outputs[i]
        o.token_ids.append(tok)
        o.delta_token_ids.append(tok)
        if req.trigger_scan >= 0 and not req.finished:
            self._check_trigger(req, group.detoks[i].output_text)
        lp = out.logprobs.get(req.request_id)
        if lp is not None and o.logprobs is not None:
            o.logprobs.append(self._logprob(tok, lp))
        if req.finished:
            group.detoks[i].finish()
            o.finish_reason, o.stop_reason = req.finish_reason, req.stop_reason

    def _check_trigger(self, req: Request, text: str) -> None:
        """Start the request's grammar once its output contains params.grammar_trigger."""
        trigger = req.params.grammar_trigger
        at = text.find(trigger, max(0, req.trigger_scan - len(trigger) + 1))
        if at < 0:
            req.trigger_scan = len(text)
            return
        req.trigger_scan = -1
        req.guide = self.structured.guide_after(req.params, text[at + len(trigger):])
        if req.guide is None:  # the token that completed the trigger already left the grammar
            log.warning("request %s: output after %r breaks its grammar; left unconstrained", req.request_id, trigger)
        elif req.guide.done:
            self._finish(req.request_id, "stop", None)

    def _advance_guide(self, req: Request, tok: int) -> None:
        """Move the request's grammar past `tok`; end the request once the grammar is complete, so a
        structured output never waits one more step for an end-of-sequence token."""
        if not req.guide.accept(tok):  # the mask allowed it, so this is a library or engine bug
            log.error("request %s: grammar rejected token %d: %s", req.request_id, tok, req.guide.error)
            self._finish(req.request_id, "abort", None)
        elif req.guide.done:
            self._finish(req.request_id, "stop", None)

    def _logprob(self, tok: int, lp) -> Logprob:
        dec = self.tokenizer.decode
        return Logprob(tok, dec([tok], skip_special_tokens=False), lp.logprob,
                       [(t, dec([t], skip_special_tokens=False), v) for t, v in lp.top])

    # -- outputs -----------------------------------------------------------------------------
    def emit(self, group: Group) -> RequestOutput:
        """The group's output now (with the deltas since the last one); a finished group is dropped."""
        outs = []
        for i, o in enumerate(group.outputs):
            det = group.detoks[i]
            o.text = det.output_text
            o.delta_text = det.get_delta()
            snap = copy.copy(o)
            snap.token_ids = list(o.token_ids)
            snap.logprobs = None if o.logprobs is None else list(o.logprobs)
            outs.append(snap)
            o.delta_token_ids = []
        finished = all(o.finished for o in group.outputs)
        if finished:
            self.drop(group)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs, finished,
                             group.children[0].num_cached_tokens)

    def end(self, group: Group, reason: str) -> None:
        """Mark every unfinished choice of the group finished with `reason` (the scheduler is told by the caller)."""
        for i, o in enumerate(group.outputs):
            if o.finish_reason is None:
                o.finish_reason = reason
                group.detoks[i].finish()

    @staticmethod
    def failed(group: Group, error: Exception) -> RequestOutput:
        """The final output of a group the engine could not carry on; touches no detokenizer (it may be
        what broke)."""
        outs = []
        for o in group.outputs:
            snap = copy.copy(o)
            snap.token_ids, snap.delta_token_ids, snap.delta_text = list(o.token_ids), [], ""
            snap.logprobs = None if o.logprobs is None else list(o.logprobs)
            if snap.finish_reason is None:
                snap.finish_reason = "abort"
            outs.append(snap)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs, True,
                             group.children[0].num_cached_tokens, error=error)
