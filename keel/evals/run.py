"""Asking a target every sample of every case, concurrently, with each answer appended to a file as it
comes, so an interrupted run resumes where it stopped."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict

from keel.errors import KeelError
from keel.evals.suite import Case
from keel.evals.targets import Answer, Target


def collect(target: Target, cases: list[Case], path: str, concurrency: int, progress=None) -> dict:
    """(case id, sample) -> Answer for every sample, read from `path` where a previous run left it and
    asked of the target otherwise. The file's first line names the target it holds answers of."""
    done: dict[tuple[str, int], Answer] = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        if lines and json.loads(lines[0]).get("target") != target.key():
            raise KeelError(f"{path} holds the answers of another target ({json.loads(lines[0]).get('target')}); "
                            f"use another --out")
        for line in lines[1:]:
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut by an interruption: asked again
            key = (rec.pop("case"), rec.pop("sample"))
            done[key] = Answer(**rec)
    else:
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps({"target": target.key()}) + "\n")
    todo = [(c, s) for c in cases for s in range(c.samples) if (c.id, s) not in done]
    total = len(done) + len(todo)
    if progress is not None:
        progress(len(done), total)
    if not todo:
        return done
    with target, open(path, "a", encoding="utf-8") as out, ThreadPoolExecutor(concurrency) as pool:
        futures = {pool.submit(target.ask, c.request(s)): (c.id, s) for c, s in todo}
        for fut in as_completed(futures):
            cid, s = futures[fut]
            answer = fut.result()
            done[(cid, s)] = answer
            out.write(json.dumps({"case": cid, "sample": s, **asdict(answer)}) + "\n")
            out.flush()
            if progress is not None:
                progress(len(done), total)
    return done
