"""Command-line options generated from the config dataclasses (keel.config): one option per field,
named after it (`max_num_seqs` -> `--max-num-seqs`, or the flags in its metadata), typed from its
annotation, its help text the field's docstring. A field added to a config class is an option of every
command that loads a model, with nothing to write here."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import textwrap

from keel.config import GROUPS, EngineConfig

_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the string literal that follows it), one line."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _kind(f: dataclasses.Field) -> type:
    """The command-line type of a field from its annotation: the first of int, float, str or bool it
    names (`int | None` -> int); str for anything else."""
    names = [part.strip() for part in str(f.type).split("|")]
    return next((_TYPES[n] for n in names if n in _TYPES), str)


def add_options(parser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass `cls` on `parser` (a parser or an argument group)."""
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        meta = f.metadata
        flags = meta.get("flags", ("--" + f.name.replace("_", "-"),))
        kind = _kind(f)
        default = f.default
        kw = {"dest": f.name, "default": default, "help": docs.get(f.name, "")}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            if "choices" in meta:
                kw["choices"] = meta["choices"]
            if "metavar" in meta:
                kw["metavar"] = meta["metavar"]
        parser.add_argument(*flags, **kw)


def add_engine_options(parser: argparse.ArgumentParser, groups=("load", "compute", "cache", "scheduler"),
                       titles: dict[str, str] | None = None) -> None:
    """Options for every field of these groups of EngineConfig, each group under its own heading."""
    for name in groups:
        cls = GROUPS[name]
        title = (titles or {}).get(name) or (cls.__doc__ or name).splitlines()[0].rstrip(".")
        add_options(parser.add_argument_group(title), cls)


def engine_config_from_args(args: argparse.Namespace, **changes) -> EngineConfig:
    """The EngineConfig that parsed options describe (groups without options keep their defaults);
    `changes` then set fields by name, as keel.config.engine_config does."""
    from keel.config import engine_config
    given = {}
    for name, cls in GROUPS.items():
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        if values:
            given[name] = cls(**values)
    return engine_config(engine_config(**given), **changes)
