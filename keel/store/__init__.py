"""State the server keeps across requests and restarts, in one embedded SQLite database."""

from keel.store.responses import ResponseStore, default_state_path

__all__ = ["ResponseStore", "default_state_path"]
