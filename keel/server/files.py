"""/v1/files: upload (multipart, `purpose` fine-tune or batch, JSONL checked line by line before it is
kept), list (`purpose`, `limit`, `after`, `order`), retrieve, download the content, delete.

Choices: a bad file is refused at upload with a 400 naming the first bad line, so a job never starts
on data that cannot train; `expires_after` is refused (files are kept until deleted); the largest upload
is the server's --max-upload-bytes (512 MiB by default, OpenAI's limit per file).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from keel.server.common import get_state, page
from keel.server.errors import APIError, shown
from keel.store.files import PURPOSES, card

router = APIRouter()
MAX_FILENAME = 512


def service(request: Request):
    ft = get_state(request).fine_tuning
    if ft is None:
        raise APIError(404, "Files and fine-tuning are turned off on this server (--no-fine-tuning).",
                       code="fine_tuning_disabled")
    return ft


def not_found(file_id: str) -> APIError:
    return APIError(404, f"No such File object: {shown(file_id)}", code="file_not_found", param="file_id")


@router.post("/files")
async def upload_file(request: Request):
    from keel.finetune.data import DataError, parse_jsonl
    ft = service(request)
    try:
        form = await request.form()
    except Exception as e:  # not multipart, or a malformed body: starlette raises several types
        raise APIError(400, f"upload a file as multipart/form-data with fields `file` and `purpose`: {e}",
                       param="file") from None
    unknown = set(form.keys()) - {"file", "purpose"}
    if unknown:
        raise APIError(400, f"unsupported field(s) {', '.join(sorted(unknown))}: this server takes `file` and "
                            f"`purpose` (files are kept until deleted)", param=sorted(unknown)[0])
    purpose, upload = form.get("purpose"), form.get("file")
    if not isinstance(purpose, str) or purpose not in PURPOSES:
        raise APIError(400, f"purpose {shown(str(purpose))!r} is not supported here; use one of {', '.join(PURPOSES)}",
                       param="purpose")
    if upload is None or isinstance(upload, str):
        raise APIError(400, "`file` must be an uploaded file", param="file")
    filename = (upload.filename or "upload.jsonl")[:MAX_FILENAME]
    data = await upload.read()
    try:
        records = await run_in_threadpool(parse_jsonl, data, purpose)
    except DataError as e:
        raise APIError(400, f"Invalid file format for purpose {purpose}: {e}", code="invalid_file_format",
                       param="file") from None
    record = await run_in_threadpool(ft.files.create, filename, purpose, data, len(records))
    return card(record)


@router.get("/files")
async def list_files(request: Request, purpose: str | None = None, limit: int = 10000, after: str | None = None,
                     order: str = "desc"):
    ft = service(request)
    if order not in ("asc", "desc"):
        raise APIError(400, "order must be asc or desc", param="order")
    if not 1 <= limit <= 10000:
        raise APIError(400, "limit must be between 1 and 10000", param="limit")
    found, more = await run_in_threadpool(ft.files.list, purpose, limit, after, order)
    return page([card(f) for f in found], more)


async def _get(request: Request, file_id: str) -> tuple[object, dict]:
    ft = service(request)
    record = await run_in_threadpool(ft.files.get, file_id)
    if record is None:
        raise not_found(file_id)
    return ft, record


@router.get("/files/{file_id}")
async def retrieve_file(file_id: str, request: Request):
    return card((await _get(request, file_id))[1])


@router.get("/files/{file_id}/content")
async def file_content(file_id: str, request: Request):
    ft, record = await _get(request, file_id)
    data = await run_in_threadpool(ft.files.read, file_id)
    return Response(data, media_type="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{record["id"]}.jsonl"'})


@router.delete("/files/{file_id}")
async def delete_file(file_id: str, request: Request):
    ft = service(request)
    if not await run_in_threadpool(ft.files.delete, file_id):
        raise not_found(file_id)
    return {"id": file_id, "object": "file", "deleted": True}
