"""The server side of fine-tuning: files and jobs on disk and in the database, and the runner thread
that validates jobs, starts one training worker process at a time, watches it, cancels it, and serves
each finished adapter under its fine-tuned model name.

On start, a job found `running` (its server was killed) goes back to `queued` and its next worker
resumes it from its last checkpoint; every succeeded job's adapter is served again.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass

from keel.errors import KeelError
from keel.finetune.worker import RESULT_FILE
from keel.store.db import Database, data_dir, default_url, dumps, loads
from keel.store.files import FileStore
from keel.store.jobs import FINISHED, JobStore, fine_tuned_name

log = logging.getLogger("keel.finetune")


@dataclass
class ServedModel:
    """The model the server serves and jobs train adapters for."""
    name: str
    path: str
    max_len: int
    tokenizer: object
    device: str = "cpu"
    max_rank: int = 256  # the largest adapter rank the server serves


def _die_with_parent() -> None:
    """In the worker, before exec: Linux sends it SIGKILL when the server process dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the worker also checks its parent between steps


class FineTuning:
    def __init__(self, base: ServedModel, folder: str | None = None, url: str | None = None,
                 register=None, threads: int = 0, poll_s: float = 0.2) -> None:
        """register(name, adapter folder): serve a finished adapter (None: not served).
        threads: torch threads of each worker (0: half the cores, at least 1, so serving keeps the rest)."""
        self.folder = os.path.abspath(folder or data_dir())
        os.makedirs(self.folder, exist_ok=True)
        self.db = Database(url or default_url(self.folder))
        self.files = FileStore(self.db, self.folder)
        self.jobs = JobStore(self.db)
        self.base, self.register, self.poll_s = base, register, poll_s
        self.threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self._proc: subprocess.Popen | None = None
        self._running: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def job_folder(self, job_id: str) -> str:
        return os.path.join(self.folder, "fine_tuning", job_id)

    # -- start / stop ----------------------------------------------------------------------------
    def start(self) -> None:
        for job in self.jobs.list(limit=1_000_000, status=("running",))[0]:
            self.jobs.update(job["id"], status="queued")
            self.jobs.event(job["id"], "The server restarted: the job resumes from its last checkpoint")
        for job in self.jobs.list(limit=1_000_000, status=("succeeded",))[0]:
            self._serve(job)
        self._thread = threading.Thread(target=self._loop, name="keel-finetune", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        """Stop the runner; a training worker is stopped too and its job resumes on the next start."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self.db.close()

    # -- jobs ------------------------------------------------------------------------------------
    def create_job(self, training_file: str, validation_file: str | None, settings, seed: int, suffix: str | None,
                   request: dict) -> dict:
        """A new job (validating_files). Its files are linked into the job's folder first, so deleting
        an uploaded file later never takes a job's data away."""
        job = self.jobs.create(model=self.base.name, model_path=self.base.path, training_file=training_file,
                               validation_file=validation_file, suffix=suffix, seed=seed,
                               settings=dumps(settings.to_dict()), request=dumps(request))
        folder = self.job_folder(job["id"])
        os.makedirs(folder, exist_ok=True)
        for file_id, name in ((training_file, "training.jsonl"), (validation_file, "validation.jsonl")):
            if file_id:
                _link_or_copy(self.files.path(file_id), os.path.join(folder, name))
        return job

    def cancel(self, job_id: str) -> bool:
        """Cancel a job that has not finished; False when it had. A running worker is stopped at once."""
        self.jobs.update(job_id, only_if_status=("validating_files", "queued", "running"), cancel_requested=True)
        return self.jobs.finish(job_id, "cancelled", "The job was cancelled", estimated_finish=None)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self._tick()
            except Exception:  # the runner must outlive any one job's trouble
                log.exception("fine-tuning runner")

    def _tick(self) -> None:
        for job in self.jobs.list(limit=100, status=("validating_files",), oldest_first=True)[0]:
            self._validate(job)
        if self._proc is not None:
            self._watch()
        if self._proc is None:
            queued = self.jobs.list(limit=1, status=("queued",), oldest_first=True)[0]
            if queued:
                self._launch(queued[0])

    def _validate(self, job: dict) -> None:
        from keel.finetune.data import DataError, read_examples
        from keel.finetune.settings import TrainSettings
        settings = TrainSettings.from_dict(loads(job["settings"]))
        folder = self.job_folder(job["id"])
        for name, param in (("training.jsonl", "training_file"), ("validation.jsonl", "validation_file")):
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                continue
            try:
                read_examples(path, self.base.tokenizer, settings.max_seq_length)
            except (DataError, KeelError) as e:
                self.jobs.finish(job["id"], "failed", f"The {param.replace('_', ' ')} is invalid: {e}", level="error",
                                 error={"code": f"invalid_{param}", "message": str(e), "param": param})
                return
        if self.jobs.update(job["id"], only_if_status=("validating_files",), status="queued"):
            self.jobs.event(job["id"], "Files validated, the job is queued")

    def _launch(self, job: dict) -> None:
        cmd = [sys.executable, "-m", "keel.finetune.worker", job["id"], "--database-url", self.db.url,
               "--data-dir", self.folder, "--threads", str(self.threads), "--device", self.base.device]
        log_path = os.path.join(self.job_folder(job["id"]), "worker.log")
        with open(log_path, "ab") as out:
            self._proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self._running = job["id"]
        log.info("fine-tuning job %s: worker %d started", job["id"], self._proc.pid)

    def _watch(self) -> None:
        job = self.jobs.get(self._running)
        code = self._proc.poll()
        if code is None:
            if job["status"] == "cancelled":
                self._proc.kill()
                self._proc.wait()
                self._proc = self._running = None
            return
        self._proc = self._running = None
        result = os.path.join(self.job_folder(job["id"]), RESULT_FILE)
        if code == 0 and job["status"] == "running" and os.path.exists(result):
            with open(result) as f:
                trained = json.load(f)["trained_tokens"]
            name = fine_tuned_name(job)
            self._serve(job)
            self.jobs.event(job["id"], f"New fine-tuned model created: {name}")
            self.jobs.finish(job["id"], "succeeded", "The job has successfully completed", fine_tuned_model=name,
                             trained_tokens=trained, estimated_finish=None)
        elif job["status"] not in FINISHED:
            self.jobs.finish(job["id"], "failed", f"The training worker exited with code {code}", level="error",
                             error={"code": "training_error", "message": f"the training worker exited with code {code} "
                                    f"(see {os.path.join(self.job_folder(job['id']), 'worker.log')})", "param": None})

    def _serve(self, job: dict) -> None:
        if self.register is None:
            return
        adapter = os.path.join(self.job_folder(job["id"]), "adapter")
        try:
            self.register(fine_tuned_name(job), adapter)
        except KeelError as e:  # e.g. a rank over the server's --max-lora-rank
            self.jobs.event(job["id"], f"The fine-tuned model cannot be served here: {e}", level="warn")


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)

