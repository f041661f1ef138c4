"""The platform's database: uploaded files, fine-tuning jobs (their events and checkpoints), API keys and
their usage.

SQLAlchemy Core over SQLite by default (a file under keel's data folder, WAL so the training worker
process and the server read and write it at once); any other SQLAlchemy URL (Postgres) by setting.
Rows are plain dicts out of this module; JSON-valued columns hold text. The serving process and each
training worker open their own `Database` on the same URL.
"""

from __future__ import annotations

import json
import os

import sqlalchemy as sa

from keel.errors import KeelError

metadata = sa.MetaData()

files = sa.Table(
    "files", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("bytes", sa.Integer, nullable=False),
    sa.Column("filename", sa.String(512), nullable=False),
    sa.Column("purpose", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("sha256", sa.String(64), nullable=False),
    sa.Column("lines", sa.Integer, nullable=False),  # JSONL records
    sa.Column("seq", sa.Integer, nullable=False),  # creation order (ids are random): pagination key
)

jobs = sa.Table(
    "fine_tuning_jobs", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("finished_at", sa.Integer),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("model", sa.String(256), nullable=False),  # the served base model's name
    sa.Column("model_path", sa.Text, nullable=False),  # where its weights are (never shown to clients)
    sa.Column("training_file", sa.String(64), nullable=False),
    sa.Column("validation_file", sa.String(64)),
    sa.Column("suffix", sa.String(64)),
    sa.Column("seed", sa.Integer, nullable=False),
    sa.Column("settings", sa.Text, nullable=False),  # JSON: resolved hyperparameters and LoRA settings
    sa.Column("request", sa.Text, nullable=False),  # JSON: method and metadata as given
    sa.Column("fine_tuned_model", sa.String(512)),
    sa.Column("trained_tokens", sa.Integer),
    sa.Column("error", sa.Text),  # JSON {code, message, param}
    sa.Column("estimated_finish", sa.Integer),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
)

events = sa.Table(
    "fine_tuning_events", metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(64), nullable=False, unique=True),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("level", sa.String(8), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("type", sa.String(16), nullable=False),
    sa.Column("data", sa.Text),  # JSON
)

checkpoints = sa.Table(
    "fine_tuning_checkpoints", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), sa.ForeignKey("fine_tuning_jobs.id", ondelete="CASCADE"), nullable=False,
              index=True),
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("step_number", sa.Integer, nullable=False),
    sa.Column("metrics", sa.Text, nullable=False),  # JSON
    sa.Column("path", sa.Text, nullable=False),  # the checkpoint folder (adapter + trainer state)
)

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("id", sa.String(64), primary_key=True),  # "key-..." : shown, never a credential
    sa.Column("seq", sa.Integer, nullable=False),
    sa.Column("name", sa.String(128), nullable=False),
    sa.Column("hash", sa.String(64), nullable=False, unique=True),  # sha256 of the secret; the secret is not kept
    sa.Column("hint", sa.String(16), nullable=False),  # the secret's last characters, to tell keys apart
    sa.Column("created_at", sa.Integer, nullable=False),
    sa.Column("revoked_at", sa.Integer),
    sa.Column("admin", sa.Boolean, nullable=False, default=False),
    sa.Column("models", sa.Text),  # JSON list of model / adapter name patterns; NULL: every model
    sa.Column("rpm", sa.Integer),  # requests per minute; NULL: no limit
    sa.Column("tpm", sa.Integer),  # tokens (prompt + completion) per minute
    sa.Column("budget_tokens", sa.Integer),  # tokens over the key's life
)

key_usage = sa.Table(
    "api_key_usage", metadata,
    sa.Column("key_id", sa.String(64), sa.ForeignKey("api_keys.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("model", sa.String(512), primary_key=True),
    sa.Column("requests", sa.Integer, nullable=False, default=0),
    sa.Column("errors", sa.Integer, nullable=False, default=0),
    sa.Column("prompt_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("completion_tokens", sa.Integer, nullable=False, default=0),
    sa.Column("latency_ms", sa.Float, nullable=False, default=0.0),  # summed over requests
)


def data_dir() -> str:
    """keel's data folder: $KEEL_DATA_DIR, else $XDG_DATA_HOME/keel (~/.local/share/keel)."""
    env = os.environ.get("KEEL_DATA_DIR")
    if env:
        return env
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "keel")


def default_url(folder: str) -> str:
    """$KEEL_DATABASE_URL, else an SQLite file in the data folder."""
    return os.environ.get("KEEL_DATABASE_URL") or "sqlite:///" + os.path.join(os.path.abspath(folder), "keel.sqlite3")


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        try:
            if url.startswith("sqlite:///") and not url.startswith("sqlite:///:memory:"):
                os.makedirs(os.path.dirname(os.path.abspath(url[len("sqlite:///"):])), exist_ok=True)
            self.engine = sa.create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
            if self.engine.dialect.name == "sqlite":
                sa.event.listen(self.engine, "connect", _sqlite_pragmas)
            metadata.create_all(self.engine)
        except (OSError, sa.exc.SQLAlchemyError) as e:
            raise KeelError(f"the database {redacted(url)} cannot be opened: {e}") from None

    def begin(self):
        """A transaction: `with db.begin() as c: c.execute(...)`."""
        return self.engine.begin()

    def close(self) -> None:
        self.engine.dispose()


def _sqlite_pragmas(conn, _record) -> None:
    cur = conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never wait on the writer, across processes
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA synchronous=NORMAL")  # WAL keeps committed data through a process kill
    cur.close()


def redacted(url: str) -> str:
    """The URL with any password hidden, for logs and messages."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL at all: nothing to hide
        return url


def paginate(db: "Database", q, table, key, after: str | None, limit: int, descending: bool) -> tuple[list[dict], bool]:
    """(rows, has_more): at most `limit` rows of query q ordered by column `key`, after the row whose id
    is `after` (OpenAI's cursor pagination; an unknown cursor starts at the beginning)."""
    with db.begin() as c:
        if after:
            anchor = c.execute(sa.select(key).where(table.c.id == after)).scalar()
            if anchor is not None:
                q = q.where(key < anchor if descending else key > anchor)
        found = [row(r) for r in c.execute(q.order_by(key.desc() if descending else key.asc()).limit(limit + 1))]
    return found[:limit], len(found) > limit


def row(r) -> dict | None:
    return None if r is None else dict(r._mapping)


def dumps(value) -> str | None:
    return None if value is None else json.dumps(value)


def loads(text: str | None):
    return None if text is None else json.loads(text)
