"""Turn a batch of logits into tokens, each row under its own request's sampling parameters.

Every seeded request draws from its own torch.Generator, one fixed-size draw per token, so its
tokens do not depend on what else is in the batch. A request is the runner's copy
(keel.engine.model_runner.RunnerRequest): request_id, params, prompt and output token ids, eos ids.
"""

from __future__ import annotations

import logging

import torch

from keel.engine.guided import apply_bitmasks
from keel.engine.outputs import TokenLogprobs

log = logging.getLogger("keel.engine")
# Below this temperature a request samples greedily (as in vLLM): dividing logits by a far smaller one
# overflows float32, and the distribution is a point mass on the argmax long before that anyway.
MIN_TEMPERATURE = 1e-5


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.generators: dict[str, torch.Generator] = {}
        self.default_generator = torch.Generator(device=device)
        self.default_generator.seed()

    def drop(self, request_ids) -> None:
        for rid in request_ids:
            self.generators.pop(rid, None)

    def _generator(self, req) -> torch.Generator:
        g = self.generators.get(req.request_id)
        if g is None:
            g = torch.Generator(device=self.device)
            g.manual_seed(req.params.seed % 2**64)  # torch takes seeds in [0, 2**64)
            self.generators[req.request_id] = g
        return g

    def __call__(self, logits: torch.Tensor, reqs: list, bitmasks: dict[str, torch.Tensor] | None = None
                 ) -> tuple[list[int], list[TokenLogprobs | None], dict[str, Exception]]:
        """Tokens, logprobs, and the requests whose own settings failed to apply (request id -> error):
        their rows are sampled unadjusted, and the engine ends them, not the whole batch.
        bitmasks: request id -> the tokens its grammar allows (keel.engine.guided.fill_bitmask)."""
        # logits: [N, V] float32, one row per request that samples this step
        raw = logits
        want_lp = [r.params.logprobs is not None for r in reqs]
        logits = logits.clone()
        errors: dict[str, Exception] = {}
        for i, r in enumerate(reqs):
            try:
                self._adjust_row(logits[i], r)
            except Exception as e:
                log.exception("request %s: its sampling settings failed", r.request_id)
                errors[r.request_id] = e
                logits[i] = raw[i]
        bitmasks = bitmasks or {}
        guided = [i for i, r in enumerate(reqs) if r.request_id in bitmasks]
        if guided:  # after penalties and biases, so nothing can bring back a token the grammar forbids
            apply_bitmasks(logits, guided, [bitmasks[reqs[i].request_id] for i in guided])

        temps = torch.tensor([r.params.temperature for r in reqs], device=logits.device)
        greedy = temps < MIN_TEMPERATURE
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            idx = (~greedy).nonzero().squeeze(1)
            sub = logits[idx] / temps[idx].unsqueeze(1)
            sub = self._filter(sub, [reqs[i] for i in idx.tolist()])
            probs = sub.softmax(dim=-1)
            # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one draw of fixed size per row.
            noise = torch.empty_like(probs)
            unseeded = []
            for row, i in enumerate(idx.tolist()):
                if reqs[i].params.seed is not None:
                    noise[row].exponential_(generator=self._generator(reqs[i]))
                else:
                    unseeded.append(row)
            if unseeded:
                rows = torch.tensor(unseeded, device=logits.device)
                noise[rows] = torch.empty(len(unseeded), probs.shape[1], device=logits.device).exponential_(
                    generator=self.default_generator)
            tokens[idx] = (probs / noise).argmax(dim=-1)
        token_list = tokens.tolist()

        lps: list[TokenLogprobs | None] = [None] * len(reqs)
        if any(want_lp):
            logprobs = raw.log_softmax(dim=-1)
            k = max(r.params.logprobs or 0 for r in reqs)
            top_v, top_i = logprobs.topk(max(k, 1), dim=-1)
            chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
            top_v, top_i = top_v.tolist(), top_i.tolist()
            for i, r in enumerate(reqs):
                if want_lp[i]:
                    n = r.params.logprobs
                    lps[i] = TokenLogprobs(chosen[i], list(zip(top_i[i][:n], top_v[i][:n])))
        return token_list, lps, errors

    @staticmethod
    def _adjust_row(row: torch.Tensor, r) -> None:
        """Penalties, logit bias and min_tokens, in place on one row of logits."""
        p = r.params
        out = r.output_token_ids
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(r.prompt_token_ids) | set(out)), dtype=torch.long, device=row.device)
            vals = row[seen]
            row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if out and (p.presence_penalty or p.frequency_penalty):
            ids = torch.tensor(out, dtype=torch.long, device=row.device)
            counts = torch.zeros_like(row).index_add_(0, ids, torch.ones_like(ids, dtype=row.dtype))
            row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        if p.logit_bias:
            for tok, bias in p.logit_bias.items():
                row[int(tok)] += bias
        if len(out) < p.min_tokens:
            banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(r.eos_token_ids))
            if banned:
                row[torch.tensor(banned, dtype=torch.long, device=row.device)] = float("-inf")

    @staticmethod
    def _filter(logits: torch.Tensor, reqs: list) -> torch.Tensor:
        """top_k, top_p and min_p on temperature-scaled logits [N, V]; removed tokens get -inf."""
        top_k = [r.params.top_k for r in reqs]
        top_p = [r.params.top_p for r in reqs]
        min_p = [r.params.min_p for r in reqs]
        if any(min_p):
            probs = logits.softmax(dim=-1)
            mp = torch.tensor(min_p, device=logits.device).unsqueeze(1)
            logits = logits.masked_fill(probs < mp * probs.max(dim=-1, keepdim=True).values, float("-inf"))
        if not any(top_k) and all(p == 1.0 for p in top_p):
            return logits
        V = logits.shape[1]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ks = torch.tensor([k if k > 0 else V for k in top_k], device=logits.device).unsqueeze(1)
        ranks = torch.arange(V, device=logits.device).unsqueeze(0)
        drop = ranks >= ks
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        ps = torch.tensor(top_p, device=logits.device).unsqueeze(1)
        # keep a token when the mass before it is below top_p: the most likely token always stays
        drop |= (probs.cumsum(dim=-1) - probs) >= ps
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        return torch.empty_like(logits).scatter_(1, order, sorted_logits)
