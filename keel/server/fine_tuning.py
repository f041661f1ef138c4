"""/v1/fine_tuning/jobs: create, list, retrieve, cancel, events, checkpoints (OpenAI's shapes).

A job trains a LoRA adapter for the served model in a worker process (keel.finetune); when it
succeeds, its `fine_tuned_model` is served at once as an adapter of that model. keel's extension: a
top-level `lora` object {r, alpha, dropout, target_modules}, and the hyperparameters max_seq_length,
checkpoint_interval and warmup_ratio beside OpenAI's three (see keel.finetune.settings).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from keel.errors import InvalidRequestError
from keel.server.body import documented
from keel.server.errors import APIError, shown
from keel.server.files import service
from keel.store.jobs import checkpoint_card, event_card, fine_tuned_name, job_card
from keel.server.common import get_state, page, read_body

router = APIRouter()
_SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: dict[str, Any] | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised"]
    supervised: Supervised | None = None


class CreateJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    method: Method | None = None
    hyperparameters: dict[str, Any] | None = None  # the older top-level form OpenAI still accepts
    metadata: dict[str, str] | None = None
    integrations: list[dict] | None = None
    lora: dict[str, Any] | None = None  # keel's extension


def _job_not_found(job_id: str) -> APIError:
    return APIError(404, f"No fine-tuning job with id '{shown(job_id)}'.", code="fine_tuning_job_not_found",
                    param="fine_tuning_job_id")


def _file(ft, file_id: str, param: str) -> dict:
    record = ft.files.get(file_id)
    if record is None:
        raise APIError(400, f"{param} {shown(file_id)!r} does not exist (deleted, or never uploaded here).",
                       code="invalid_file", param=param)
    if record["purpose"] != "fine-tune":
        raise APIError(400, f"{param} {file_id} was uploaded with purpose {record['purpose']!r}; a fine-tuning "
                            f"job needs a file uploaded with purpose 'fine-tune'.", code="invalid_file", param=param)
    return record


@router.post("/fine_tuning/jobs", openapi_extra=documented(CreateJob))
async def create_job(request: Request):
    import secrets

    from keel.finetune.settings import resolve
    ft = service(request)
    body = await read_body(request, CreateJob)
    if body.model != ft.base.name:
        if body.model.startswith("ft:") or get_state(request).is_adapter(body.model):
            raise APIError(400, f"`{shown(body.model)}` is an adapter; fine-tune the base model `{ft.base.name}` "
                                f"(training on top of an adapter is not supported).", code="invalid_value", param="model")
        raise APIError(400, f"Model {shown(body.model)} is not available for fine-tuning here; this server fine-tunes "
                            f"`{ft.base.name}`.", code="model_not_available", param="model")
    if body.suffix is not None and not _SUFFIX.fullmatch(body.suffix):
        raise APIError(400, "suffix must be 1 to 64 letters, digits, '-' or '_'", param="suffix")
    if body.integrations:
        raise APIError(400, "integrations (wandb) are not supported by this server", param="integrations")
    if body.method is not None and body.hyperparameters is not None:
        raise APIError(400, "give hyperparameters in method.supervised.hyperparameters, not both there and at the top",
                       param="hyperparameters")
    hyper = body.hyperparameters
    if body.method is not None and body.method.supervised is not None:
        hyper = body.method.supervised.hyperparameters

    def create() -> dict:
        train = _file(ft, body.training_file, "training_file")
        if body.validation_file:
            _file(ft, body.validation_file, "validation_file")
        try:
            settings = resolve(hyper, body.lora, train["lines"], ft.base.max_len)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param=e.param) from None
        if settings.r > ft.base.max_rank:
            raise APIError(400, f"lora.r={settings.r} is over this server's --max-lora-rank of {ft.base.max_rank}: "
                                f"the adapter could not be served", param="lora.r")
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)
        return ft.create_job(body.training_file, body.validation_file, settings, seed, body.suffix,
                             {"metadata": body.metadata, "method": body.method.model_dump() if body.method else None})
    return job_card(await run_in_threadpool(create))


@router.get("/fine_tuning/jobs")
async def list_jobs(request: Request, after: str | None = None, limit: int = 20):
    ft = service(request)
    if not 1 <= limit <= 100:
        raise APIError(400, "limit must be between 1 and 100", param="limit")
    found, more = await run_in_threadpool(ft.jobs.list, after, limit)
    return {"object": "list", "data": [job_card(j) for j in found], "has_more": more}


async def _job(request: Request, job_id: str) -> tuple[object, dict]:
    ft = service(request)
    job = await run_in_threadpool(ft.jobs.get, job_id)
    if job is None:
        raise _job_not_found(job_id)
    return ft, job


@router.get("/fine_tuning/jobs/{job_id}")
async def retrieve_job(job_id: str, request: Request):
    return job_card((await _job(request, job_id))[1])


@router.post("/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request):
    ft, _ = await _job(request, job_id)
    if not await run_in_threadpool(ft.cancel, job_id):
        status = (await run_in_threadpool(ft.jobs.get, job_id))["status"]
        raise APIError(400, f"Job {job_id} has already finished ({status}); only a job that has not can be cancelled.",
                       code="job_already_finished", param="fine_tuning_job_id")
    return job_card(await run_in_threadpool(ft.jobs.get, job_id))


@router.get("/fine_tuning/jobs/{job_id}/events")
async def list_events(job_id: str, request: Request, after: str | None = None, limit: int = 20):
    ft, _ = await _job(request, job_id)
    if not 1 <= limit <= 1000:
        raise APIError(400, "limit must be between 1 and 1000", param="limit")
    found, more = await run_in_threadpool(ft.jobs.events, job_id, after, limit)
    return {"object": "list", "data": [event_card(e) for e in found], "has_more": more}


@router.get("/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, request: Request, after: str | None = None, limit: int = 10):
    ft, job = await _job(request, job_id)
    if not 1 <= limit <= 100:
        raise APIError(400, "limit must be between 1 and 100", param="limit")
    found, more = await run_in_threadpool(ft.jobs.checkpoints, job_id, after, limit)
    return page([checkpoint_card(c, fine_tuned_name(job)) for c in found], more)
