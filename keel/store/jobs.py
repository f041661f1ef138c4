"""Fine-tuning jobs, their events and checkpoints, in the database (shared by the server and the worker)."""

from __future__ import annotations

import time

import sqlalchemy as sa

from keel.store.db import Database, checkpoints, dumps, events, jobs, loads, paginate, row
from keel.store.files import new_id

FINISHED = ("succeeded", "failed", "cancelled")


class JobStore:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- jobs ------------------------------------------------------------------------------
    def create(self, **fields) -> dict:
        with self.db.begin() as c:
            seq = c.execute(sa.select(sa.func.coalesce(sa.func.max(jobs.c.seq), 0))).scalar() + 1
            record = {"id": new_id("ftjob"), "seq": seq, "created_at": int(time.time()), "status": "validating_files",
                      "cancel_requested": False, **fields}
            c.execute(jobs.insert().values(**record))
            # in the job's own transaction: the scheduler may pick the job up (and log "Files validated")
            # as soon as it is committed
            c.execute(events.insert().values(id=new_id("ftevent"), job_id=record["id"], created_at=record["created_at"],
                                             level="info", message="Validating training file", type="message",
                                             data=None))
        return self.get(record["id"])

    def get(self, job_id: str) -> dict | None:
        with self.db.begin() as c:
            return row(c.execute(jobs.select().where(jobs.c.id == job_id)).first())

    def list(self, after: str | None = None, limit: int = 20, status: tuple[str, ...] | None = None,
             oldest_first: bool = False) -> tuple[list[dict], bool]:
        q = jobs.select()
        if status:
            q = q.where(jobs.c.status.in_(status))
        return paginate(self.db, q, jobs, jobs.c.seq, after, limit, descending=not oldest_first)

    def update(self, job_id: str, only_if_status: tuple[str, ...] | None = None, **fields) -> bool:
        """Set fields; with only_if_status, only while the job is in one of those states (so that a
        worker's late write never overturns a cancel). Returns whether the row changed."""
        if "error" in fields and not isinstance(fields["error"], (str, type(None))):
            fields["error"] = dumps(fields["error"])
        q = jobs.update().where(jobs.c.id == job_id)
        if only_if_status:
            q = q.where(jobs.c.status.in_(only_if_status))
        with self.db.begin() as c:
            return c.execute(q.values(**fields)).rowcount > 0

    def finish(self, job_id: str, status: str, message: str, level: str = "info", **fields) -> bool:
        changed = self.update(job_id, only_if_status=("validating_files", "queued", "running"), status=status,
                              finished_at=int(time.time()), **fields)
        if changed:
            self.event(job_id, message, level)
        return changed

    # -- events ----------------------------------------------------------------------------
    def event(self, job_id: str, message: str, level: str = "info", type: str = "message", data: dict | None = None) -> None:
        with self.db.begin() as c:
            c.execute(events.insert().values(id=new_id("ftevent"), job_id=job_id, created_at=int(time.time()),
                                             level=level, message=message, type=type, data=dumps(data)))

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Newest first, as OpenAI lists them; `after` an event id."""
        return paginate(self.db, events.select().where(events.c.job_id == job_id), events, events.c.seq, after, limit,
                        descending=True)

    # -- checkpoints -----------------------------------------------------------------------
    def add_checkpoint(self, job_id: str, step: int, metrics: dict, path: str) -> None:
        with self.db.begin() as c:
            c.execute(checkpoints.delete().where(checkpoints.c.job_id == job_id)
                      .where(checkpoints.c.step_number == step))  # a resumed job writes a step again
            c.execute(checkpoints.insert().values(id=new_id("ftckpt"), job_id=job_id, created_at=int(time.time()),
                                                  step_number=step, metrics=dumps(metrics), path=path))

    def checkpoints(self, job_id: str, after: str | None = None, limit: int = 10) -> tuple[list[dict], bool]:
        return paginate(self.db, checkpoints.select().where(checkpoints.c.job_id == job_id), checkpoints,
                        checkpoints.c.step_number, after, limit, descending=True)


def fine_tuned_name(job: dict) -> str:
    """ft:{base}:keel:{suffix}:{id}, as OpenAI names fine-tuned models (the id without its prefix)."""
    return f"ft:{job['model']}:keel:{job['suffix'] or ''}:{job['id'].removeprefix('ftjob-')[:12]}"


def job_card(job: dict) -> dict:
    """The OpenAI fine_tuning.job object."""
    from keel.finetune.settings import TrainSettings
    settings = TrainSettings.from_dict(loads(job["settings"]))
    hyper = settings.hyperparameters()
    request = loads(job["request"]) or {}
    lora = {"r": settings.r, "alpha": settings.alpha, "dropout": settings.dropout,
            "target_modules": settings.target_modules}
    return {"object": "fine_tuning.job", "id": job["id"], "created_at": job["created_at"],
            "finished_at": job["finished_at"], "model": job["model"], "fine_tuned_model": job["fine_tuned_model"],
            "organization_id": "keel", "result_files": [], "status": job["status"],
            "training_file": job["training_file"], "validation_file": job["validation_file"],
            "hyperparameters": hyper, "trained_tokens": job["trained_tokens"], "error": loads(job["error"]),
            "seed": job["seed"], "estimated_finish": job["estimated_finish"], "integrations": [],
            "metadata": request.get("metadata"), "suffix": job["suffix"],
            "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
            "lora": lora}  # keel's extension: the adapter's shape


def event_card(e: dict) -> dict:
    out = {"object": "fine_tuning.job.event", "id": e["id"], "created_at": e["created_at"], "level": e["level"],
           "message": e["message"], "type": e["type"]}
    if e["data"] is not None:
        out["data"] = loads(e["data"])
    return out


def checkpoint_card(c: dict, fine_tuned_model: str) -> dict:
    return {"object": "fine_tuning.job.checkpoint", "id": c["id"], "created_at": c["created_at"],
            "fine_tuned_model_checkpoint": f"{fine_tuned_model}:ckpt-step-{c['step_number']}",
            "step_number": c["step_number"], "metrics": loads(c["metrics"]), "fine_tuning_job_id": c["job_id"]}
