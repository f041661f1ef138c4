"""Uploaded files (`/v1/files`): bytes on disk under the data folder, a row in the database.

A file is written to a temporary name, flushed and renamed into place before its row is committed, so
a crash leaves either a whole file with its row or a stray temporary file, never a row without bytes.
Deleting removes the row first, then the bytes.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time

import sqlalchemy as sa

from keel.store.db import Database, files, paginate, row

PURPOSES = ("fine-tune", "batch")


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class FileStore:
    def __init__(self, db: Database, folder: str) -> None:
        self.db = db
        self.folder = os.path.join(folder, "files")
        os.makedirs(self.folder, exist_ok=True)

    def path(self, file_id: str) -> str:
        return os.path.join(self.folder, file_id)

    def create(self, filename: str, purpose: str, data: bytes, lines: int) -> dict:
        file_id = new_id("file")
        tmp = self.path(file_id) + ".part"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path(file_id))
        with self.db.begin() as c:
            seq = c.execute(sa.select(sa.func.coalesce(sa.func.max(files.c.seq), 0))).scalar() + 1
            record = {"id": file_id, "created_at": int(time.time()), "bytes": len(data), "filename": filename,
                      "purpose": purpose, "status": "processed", "sha256": hashlib.sha256(data).hexdigest(),
                      "lines": lines, "seq": seq}
            c.execute(files.insert().values(**record))
        return record

    def get(self, file_id: str) -> dict | None:
        with self.db.begin() as c:
            return row(c.execute(files.select().where(files.c.id == file_id)).first())

    def list(self, purpose: str | None = None, limit: int = 10000, after: str | None = None,
             order: str = "desc") -> tuple[list[dict], bool]:
        """(files, has_more): at most `limit` files in creation order, after the file `after`."""
        q = files.select()
        if purpose:
            q = q.where(files.c.purpose == purpose)
        return paginate(self.db, q, files, files.c.seq, after, limit, descending=order == "desc")

    def read(self, file_id: str) -> bytes:
        with open(self.path(file_id), "rb") as f:
            return f.read()

    def delete(self, file_id: str) -> bool:
        with self.db.begin() as c:
            gone = c.execute(files.delete().where(files.c.id == file_id)).rowcount > 0
        if gone:
            try:
                os.remove(self.path(file_id))
            except FileNotFoundError:
                pass
        return gone


def card(record: dict) -> dict:
    """The OpenAI file object."""
    return {"id": record["id"], "object": "file", "bytes": record["bytes"], "created_at": record["created_at"],
            "expires_at": None, "filename": record["filename"], "purpose": record["purpose"],
            "status": record["status"], "status_details": None}
