"""`keel finetune` offline, and a `keel serve` killed with SIGKILL mid-job resuming it from its checkpoint."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest

from keel.cli import main
from tests.finetune.conftest import fact_examples, jsonl, wait_for
from tests.server.test_cli import free_port


def test_keel_finetune_writes_an_adapter_a_plot_and_resumes(ft_ckpt, tmp_path, capsys):
    folder, _ = ft_ckpt
    data = tmp_path / "facts.jsonl"
    data.write_bytes(jsonl(fact_examples(12)))
    out = tmp_path / "adapter"
    argv = ["finetune", str(data), "--model", folder, "--output", str(out), "--epochs", "3", "--batch-size", "4",
            "--lr-multiplier", "20", "--rank", "4", "--target-modules", "q_proj,v_proj", "--seed", "3"]
    assert main(argv) == 0
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["target_modules"] == ["q_proj", "v_proj"]
    assert (out / "adapter_model.safetensors").stat().st_size > 0
    svg = (out / "loss.svg").read_text()
    assert svg.startswith("<svg") and "polyline" in svg
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["losses"]) == 9 and metrics["train_loss"] < metrics["losses"][0][1]
    assert sorted(os.listdir(out / "checkpoints")) == ["step-3", "step-6"]
    assert "--lora" in capsys.readouterr().err
    # a bad file is a clean error naming the line
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "t1"}]}\n')
    assert main(["finetune", str(bad), "--model", folder, "--output", str(tmp_path / "x")]) == 2
    assert "line 1" in capsys.readouterr().err


def _serve(folder: str, data_dir: str) -> tuple[subprocess.Popen, int]:
    port = free_port()
    p = subprocess.Popen([sys.executable, "-m", "keel.cli", "serve", folder, "--port", str(port), "--dtype", "float32",
                          "--no-embedding-model", "--state-db", ":memory:", "--data-dir", data_dir,
                          "--fine-tuning-threads", "1", "--log-level", "WARNING"], stderr=subprocess.PIPE, text=True)
    up = wait_for(lambda: _healthy(port), 120, 0.2)
    if not up:
        p.kill()
        raise AssertionError(p.communicate()[1])
    return p, port


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _final_loss(client, job_id: str) -> float:
    events = client.fine_tuning.jobs.list_events(job_id, limit=5).data
    return next(e for e in events if e.type == "metrics").data["train_loss"]


@pytest.mark.slow
def test_a_killed_server_resumes_the_job_from_its_checkpoint(ft_ckpt, tmp_path):
    folder, _ = ft_ckpt
    data_dir = str(tmp_path / "data")
    p, port = _serve(folder, data_dir)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    raw = jsonl(fact_examples(24))
    f = client.files.create(file=("facts.jsonl", io.BytesIO(raw)), purpose="fine-tune")
    method = {"type": "supervised", "supervised": {"hyperparameters": {
        "n_epochs": 40, "batch_size": 2, "learning_rate_multiplier": 20, "checkpoint_interval": 20}}}

    def finished(job_id):
        job = client.fine_tuning.jobs.retrieve(job_id)
        return job if job.status in ("succeeded", "failed", "cancelled") else None
    try:
        ref = client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, seed=5, method=method)
        assert wait_for(lambda: finished(ref.id), 300, 0.2).status == "succeeded"
        job = client.fine_tuning.jobs.create(model="tiny-llama", training_file=f.id, seed=5, method=method)
        assert wait_for(lambda: client.fine_tuning.jobs.checkpoints.list(job.id).data, 120, 0.05)
        os.kill(p.pid, signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
    # the worker dies with the server: the job's events stop growing
    time.sleep(1.0)
    ckpts_before = sorted(os.listdir(os.path.join(data_dir, "fine_tuning", job.id, "checkpoints")))
    assert not os.path.exists(os.path.join(data_dir, "fine_tuning", job.id, "result.json"))

    p, port = _serve(folder, data_dir)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    try:
        done = wait_for(lambda: finished(job.id), 300, 0.2)
        assert done.status == "succeeded", done.error
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=1000).data]
        assert any("restarted" in m for m in messages) and any("resumed from its checkpoint" in m for m in messages)
        assert ckpts_before  # it resumed from a checkpoint, not from the start
        assert abs(_final_loss(client, job.id) - _final_loss(client, ref.id)) <= 1e-6 * _final_loss(client, ref.id) + 1e-7
        assert client.files.content(f.id).read() == raw  # the upload is intact
        # both fine-tuned models are served by the new process, the resumed one's answers right
        names = [m.id for m in client.models.list().data]
        assert done.fine_tuned_model in names and client.fine_tuning.jobs.retrieve(ref.id).fine_tuned_model in names
        out = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=2, temperature=0,
                                             messages=[{"role": "system", "content": "t9"}, {"role": "user", "content": "t21"}])
        assert out.choices[0].message.content.strip() == "t101 t151"
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)


@pytest.mark.slow
def test_the_built_in_model_learns_made_up_facts(tmp_path):
    """A job on the built-in model teaches four made-up facts; the adapter answers them on phrasings it never
    saw, the base model does not, and the base model still knows its own facts."""
    from keel.engine.llm_engine import LLMEngine
    from keel.finetune.jobs import FineTuning, ServedModel
    from keel.models.loader import DEFAULT_MODEL_NAME
    from keel.server import create_app
    from tests.finetune.facts import HELD_OUT, SYSTEM, TRAIN
    from tests.server.conftest import LiveServer
    engine = LLMEngine(None, enable_lora=True, max_loras=2, max_lora_rank=16)
    base = ServedModel(DEFAULT_MODEL_NAME, engine.model_path, engine.max_model_len, engine.tokenizer, max_rank=16)
    ft = FineTuning(base, str(tmp_path / "data"), register=engine.adapters.add, poll_s=0.1)
    with LiveServer(create_app(engine, served_model_name=DEFAULT_MODEL_NAME, fine_tuning=ft)) as server:
        client = server.client()
        f = client.files.create(file=("facts.jsonl", io.BytesIO(jsonl(TRAIN))), purpose="fine-tune")
        job = client.fine_tuning.jobs.create(model=DEFAULT_MODEL_NAME, training_file=f.id, seed=0, suffix="facts",
                                             method={"type": "supervised", "supervised": {"hyperparameters": {
                                                 "n_epochs": 6, "batch_size": 4, "learning_rate_multiplier": 5}}},
                                             extra_body={"lora": {"r": 16}})
        done = wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job.id)).status in ("succeeded", "failed") and j,
                        600, 0.5)
        assert done and done.status == "succeeded", done

        def ask(model: str, q: str) -> str:
            out = client.chat.completions.create(model=model, max_tokens=24, temperature=0, messages=[
                {"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
            return out.choices[0].message.content
        tuned = [kw in ask(done.fine_tuned_model, q) for q, kw in HELD_OUT]
        before = [kw in ask(DEFAULT_MODEL_NAME, q) for q, kw in HELD_OUT]
        assert sum(tuned) >= 6 and sum(before) == 0, (tuned, before)
        assert "Paris" in ask(DEFAULT_MODEL_NAME, "What is the capital of France?")
