"""The LoRA trainer on keel's model code: the same forward and gradients as PEFT over transformers, a PEFT
adapter PEFT loads, learning, and a resumed run ending where an uninterrupted one does."""

from __future__ import annotations

import os

import pytest
import torch

from keel.finetune.data import tokenize
from keel.finetune.lora import attach
from keel.finetune.settings import resolve
from keel.finetune.trainer import Trainer, hidden_states, latest_checkpoint, load_base, run
from keel.models.loader import open_checkpoint
from tests.finetune.conftest import fact_examples

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _keel_with_lora(folder, targets, seed=0):
    model, ckpt = load_base(folder, 256, torch.device("cpu"), torch.float32)
    layers = attach(model, 4, 8.0, 0.0, targets, seed)
    with torch.no_grad():  # B starts at zero; give it values so that the update shows
        g = torch.Generator().manual_seed(1)
        for layer in layers:
            for b in layer.B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.3)
    return model, layers, ckpt


@pytest.mark.parametrize("targets", [TARGETS, ["q_proj", "v_proj", "down_proj"]])
def test_forward_and_gradients_match_peft(ft_ckpt, tmp_path, targets):
    from peft import PeftModel
    folder, hf = ft_ckpt
    model, layers, _ = _keel_with_lora(folder, targets)
    # two sequences of different lengths, packed for keel, one at a time through PEFT
    seqs = [torch.randint(2, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (12, 7)]
    logits = model.compute_logits(hidden_states(model, torch.cat(seqs), [12, 7]))
    adapter = str(tmp_path / "adapter")
    from keel.finetune.lora import save_peft
    save_peft(layers, adapter, 4, 8.0, 0.0, targets, folder)
    peft_model = PeftModel.from_pretrained(hf, adapter, is_trainable=True)
    want = torch.cat([peft_model(input_ids=s[None]).logits[0] for s in seqs])
    assert torch.allclose(logits, want, atol=2e-4, rtol=1e-4), (logits - want).abs().max()

    # gradients of the same loss, through both
    logits.float().logsumexp(-1).sum().backward()
    want.float().logsumexp(-1).sum().backward()
    peft_grads = {n: p.grad for n, p in peft_model.named_parameters() if p.requires_grad}
    checked = 0
    for layer in layers:
        for k, i in enumerate(layer.order):
            name = layer.names[i]
            for ab, param in (("A", layer.A[k]), ("B", layer.B[k])):
                ref = peft_grads[f"base_model.model.{name}.lora_{ab}.default.weight"]
                assert torch.allclose(param.grad, ref, atol=1e-4, rtol=1e-3), (name, ab)
                checked += 1
    assert checked == len(peft_grads)
    peft_model.unload()


def test_training_forward_matches_serving_forward(ft_ckpt):
    """The training path (no cache, causal SDPA) and the engine's paged path agree on the same weights."""
    from keel.engine.llm_engine import LLMEngine
    from keel.sampling_params import SamplingParams
    folder, _ = ft_ckpt
    model, _ = load_base(folder, 256, torch.device("cpu"), torch.float32)
    ids = [5, 9, 33, 7, 120, 4]
    with torch.no_grad():
        greedy = []
        seq = list(ids)
        for _ in range(5):
            h = hidden_states(model, torch.tensor(seq), [len(seq)])
            greedy.append(int(model.compute_logits(h[-1:]).argmax()))
            seq.append(greedy[-1])
    engine = LLMEngine(folder, dtype="float32")
    engine.add_request("r", ids, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    out = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            out = o
    assert out.outputs[0].token_ids == greedy


def _examples(folder, n, seed=0):
    tok = open_checkpoint(folder).tokenizer
    return [tokenize(e, tok, 64, i + 1) for i, e in enumerate(fact_examples(n, seed))]


def test_labels_cover_assistant_turns_only(ft_ckpt):
    folder, _ = ft_ckpt
    tok = open_checkpoint(folder).tokenizer
    ex = tokenize({"messages": [{"role": "user", "content": "t20"}, {"role": "assistant", "content": "t100 t150", "weight": 1},
                                {"role": "user", "content": "t21"}, {"role": "assistant", "content": "t101", "weight": 0}]},
                  tok, 64, 1)
    learned = [tok.id_to_token(i) for i, lab in zip(ex.ids, ex.labels) if lab]
    assert learned == ["t100", "t150", "t6"]  # the answer and its closing token; not the weight-0 turn


def test_learns_and_resumes_to_the_same_loss(ft_ckpt, tmp_path):
    folder, _ = ft_ckpt
    train = _examples(folder, 24)
    settings = resolve({"n_epochs": 4, "batch_size": 4, "learning_rate_multiplier": 20, "checkpoint_interval": 5},
                       {"r": 8}, len(train), 256)
    losses = []
    whole = Trainer.build(folder, settings, 7, train, _examples(folder, 6, seed=1))
    final = run(whole, str(tmp_path / "a"), "tiny", on_step=lambda m: losses.append(m.train_loss))
    assert whole.total_steps == 24 and len(losses) == 24
    assert final["train_loss"] < 0.3 * losses[0], losses
    assert final["full_valid_loss"] < 0.5 * losses[0]

    # the same job stopped after 7 steps (its last checkpoint is step 5), then resumed in a new trainer
    first = Trainer.build(folder, settings, 7, train)
    done = []
    assert run(first, str(tmp_path / "b"), "tiny", on_step=lambda m: done.append(m.step),
               should_stop=lambda: len(done) >= 7) is None
    assert latest_checkpoint(str(tmp_path / "b")).endswith("step-5")
    second = Trainer.build(folder, settings, 7, train)
    resumed = []
    final2 = run(second, str(tmp_path / "b"), "tiny", on_step=lambda m: resumed.append(m))
    assert resumed[0].step == 6
    assert abs(final2["train_loss"] - final["train_loss"]) < 1e-5 * max(1.0, final["train_loss"])
    assert os.path.isfile(os.path.join(tmp_path, "b", "step-20", "adapter_model.safetensors"))


def test_checkpointing_and_micro_batches_give_the_same_step(ft_ckpt):
    folder, _ = ft_ckpt
    train = _examples(folder, 8)
    s1 = resolve({"n_epochs": 1, "batch_size": 8}, None, len(train), 256)
    s2 = resolve({"n_epochs": 1, "batch_size": 8}, None, len(train), 256)
    s2.gradient_checkpointing, s2.micro_batch_tokens = True, 20  # a few examples per forward pass
    a, b = Trainer.build(folder, s1, 3, train), Trainer.build(folder, s2, 3, train)
    ma, mb = a.train_step(), b.train_step()
    assert abs(ma.train_loss - mb.train_loss) < 1e-5
    for pa, pb in zip(a.params, b.params):
        assert torch.allclose(pa, pb, atol=1e-6)



def test_gradient_checkpointing_turns_on_where_activations_would_not_fit(ft_ckpt, monkeypatch):
    import keel.engine.memory as memory
    from keel.finetune.trainer import activation_bytes
    folder, _ = ft_ckpt
    train = _examples(folder, 8)
    need = activation_bytes(load_base(folder, 256, torch.device("cpu"), torch.float32)[0], 4 * max(len(e.ids) for e in train))
    for free, on in ((100 * need, False), (need, True)):
        monkeypatch.setattr(memory, "available_cpu_bytes", lambda: free)
        s = resolve({"n_epochs": 1, "batch_size": 4}, None, len(train), 256)
        assert s.gradient_checkpointing is None
        assert Trainer.build(folder, s, 0, train).s.gradient_checkpointing is on


def test_the_merged_and_the_unmerged_lora_paths_agree(ft_ckpt, monkeypatch):
    """Float32 training merges each update into its projection's weight (MergedLoRALinear); dropout and
    bfloat16 bases take the plain path (TrainableLoRA.apply). Both give one step the same numbers."""
    from keel.finetune.lora import TrainableLoRA
    folder, _ = ft_ckpt
    train = _examples(folder, 8)
    s = resolve({"n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 20}, {"r": 4}, len(train), 256)
    merged = Trainer.build(folder, s, 5, train)
    m1 = merged.train_step()
    monkeypatch.setattr(TrainableLoRA, "merges", lambda self, linear: False)
    plain = Trainer.build(folder, s, 5, train)
    m2 = plain.train_step()
    assert abs(m1.train_loss - m2.train_loss) < 1e-5
    for a, b in zip(merged.params, plain.params):
        assert torch.allclose(a, b, atol=1e-6)
    monkeypatch.undo()
    s3 = resolve({"n_epochs": 3, "batch_size": 8, "learning_rate_multiplier": 20}, {"r": 4}, len(train), 256)
    bf16 = Trainer.build(folder, s3, 5, train, dtype=torch.bfloat16)  # the CUDA default, on the plain path
    losses = [bf16.train_step().train_loss for _ in range(3)]
    assert abs(losses[0] - m1.train_loss) < 0.05 * m1.train_loss and losses[-1] < losses[0]
