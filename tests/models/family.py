"""The checks every model family passes against transformers, shared by tests/models/test_<family>.py.

A family's test module lists its tiny configurations (transformers config class, model class, overrides)
and calls these: `build` makes the checkpoint, `check_logits_and_greedy` compares one engine path
(each of keel's CPU kernel builds and PyTorch's operators), `check_engine_paths` runs prompts batched
together, with a shared prefix hitting the prefix cache and prefills chunked, `check_peft` an adapter.
"""

from __future__ import annotations

import torch

from keel import LLM, SamplingParams
from keel.layers.attention import AttentionMetadata

VOCAB = 256
PROMPTS = [[5, 6, 7], list(range(10, 27)), [(i * 7) % 250 + 2 for i in range(41)]]


def build(folder: str, cfg_name: str, model_name: str, config: dict, seed: int = 0, randomize=None):
    """Save a tiny random transformers model of this config (weights visibly random: transformers'
    init of zero biases and unit norms would hide a missing one) with a word-level tokenizer; returns it."""
    import transformers

    from tests.models.conftest import write_tokenizer
    cfg = getattr(transformers, cfg_name)(**config)
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if randomize is not None and randomize(name, p):
                continue
            if "norm" in name or "ln" in name.rsplit(".", 2)[-2]:
                p.copy_((1 + 0.2 * torch.randn_like(p)) if name.endswith("weight") else 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    model.save_pretrained(folder)
    write_tokenizer(folder)
    return model


def backends() -> list[str]:
    """Every code path this machine can run: each build of keel's CPU kernels, and PyTorch's operators."""
    from keel.kernels.cpu import kernels, runnable_isas
    return [f"keel-{isa}" for isa in runnable_isas() if kernels(isa) is not None] + ["torch"]


def engine(folder: str, backend: str = "torch", **options) -> LLM:
    kernels, _, isa = backend.partition("-")
    options = {"dtype": "float32", "num_blocks": 96, "block_size": 4, **options}
    llm = LLM(folder, kernels=kernels, cpu_isa=isa or None, **options)
    assert llm.engine.backend.isa == (isa or None)
    return llm


def keel_logits(llm: LLM, prompts: list[list[int]]) -> list[torch.Tensor]:
    """All prompts prefilled together in one forward pass; logits of every position of each."""
    eng = llm.engine
    bs = eng.cache_config.block_size
    tables = [eng.pool.allocate(-(-len(p) // bs)) for p in prompts]
    try:
        meta = AttentionMetadata.build([len(p) for p in prompts], [len(p) for p in prompts], tables, bs, eng.device)
        ids = torch.tensor([t for p in prompts for t in p])
        pos = torch.tensor([i for p in prompts for i in range(len(p))])
        with torch.inference_mode():
            logits = eng.model.compute_logits(eng.model(ids, pos, meta))
    finally:
        for t in tables:
            eng.pool.free(t)
    return list(logits.split([len(p) for p in prompts]))


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_logits(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0].float()


def check_logits_and_greedy(llm: LLM, hf, label: str, prompts=PROMPTS, tokens: int = 24, rel: float = 1e-4) -> None:
    for prompt, ours in zip(prompts, keel_logits(llm, prompts)):
        ref = hf_logits(hf, prompt)
        span = (ref.max() - ref.min()).item()
        diff = (ours - ref).abs().max().item()
        assert diff <= rel * span, f"{label}: max |logit diff| {diff:.3g} over range {span:.3g}"
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, tokens), label


def check_engine_paths(folder: str, hf, label: str, backend: str = "torch", tokens: int = 16, **options) -> None:
    """Prompts of different lengths batched together, two of them sharing a long prefix (the second a
    prefix-cache hit), prefills cut into chunks of 8 tokens: each request's greedy tokens equal
    transformers' for it alone."""
    shared = [(i * 11) % 240 + 3 for i in range(24)]
    prompts = [shared + [7, 8, 9], [4, 5], shared + [50, 60], list(range(30, 63))]
    expected = [hf_greedy(hf, p, tokens) for p in prompts]
    llm = engine(folder, backend, max_num_batched_tokens=8, **options)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    first = llm.generate(prompts[:2], params)
    rest = llm.generate(prompts[2:], params)
    got = [o.outputs[0].token_ids for o in first + rest]
    assert got == expected, label
    assert rest[0].num_cached_tokens >= 20, f"{label}: the shared prefix was not served from the cache"


def check_peft(folder: str, hf, label: str, adapter_dir: str, backend: str = "torch", seed: int = 100,
               prompts=PROMPTS, tokens: int = 16, **lora_kwargs) -> None:
    """An adapter made with peft on this checkpoint: keel's greedy tokens with it, alone and batched with
    base-model requests, equal PEFT's."""
    from keel.lora.request import LoRARequest
    from tests.lora.conftest import make_peft_adapter
    peft_model = make_peft_adapter(hf, adapter_dir, seed=seed, **lora_kwargs)
    llm = engine(folder, backend, enable_lora=True, num_blocks=192)
    llm.add_lora("a", adapter_dir)
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    outs = llm.generate(prompts + prompts, params, lora_request=[LoRARequest("a")] * len(prompts) + [None] * len(prompts))
    for k, prompt in enumerate(prompts):
        assert outs[k].outputs[0].token_ids == hf_greedy(peft_model, prompt, tokens), (label, "adapter", k)
        assert outs[len(prompts) + k].outputs[0].token_ids == hf_greedy(hf, prompt, tokens), (label, "base", k)
