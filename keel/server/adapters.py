"""LoRA adapters over HTTP: the `model` field naming an adapter, adapters in /v1/models, and
POST /v1/load_lora_adapter / POST /v1/unload_lora_adapter (the bodies vLLM's server takes).

Choices where vLLM and OpenAI say nothing:
- loading a name again with the same path is a no-op answered 200 (a deployment script can be re-run);
  the same name with another path is a 400 unless `load_inplace` is true, which swaps the adapter
  (requests already running finish on the old weights, later ones get the new);
- an adapter is validated (config, targets, shapes, base model) before the load call answers, off the
  event loop, and its weights are read in the background: the call never waits on a running batch;
- each adapter answers with its own `system_fingerprint`: the base model's combined with a digest of
  the adapter's files, so two adapters, or two versions of one, never share a fingerprint;
- a load reads only folders under the operator's allowed roots (`--lora-dir`, `--allowed-lora-path`),
  unless the operator starts the server with `--allow-any-lora-path`. A path outside them gets one
  answer whether or not it exists, so the API cannot be used to explore the server's disk; errors
  quote the path as the client gave it, never the server's absolute paths;
- /v1/models shows an adapter's name as its `root`; its folder only with `--show-lora-paths`.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from keel.errors import LoRAError, LoRANotFoundError
from keel.lora.adapter import check_adapter_name
from keel.server.body import documented
from keel.server.errors import APIError, shown
from keel.server.common import get_state, key_of, read_body

router = APIRouter()


@dataclass
class LoRAPolicy:
    """Where POST /v1/load_lora_adapter may read adapters from, and what /v1/models tells about them."""
    roots: list[str] | None = field(default_factory=list)
    """Folders (with everything under them) adapters may be loaded from; None: any path the server can
    read (`--allow-any-lora-path`); empty: no folder, so loads over the API are refused."""
    show_paths: bool = False
    """/v1/models gives each adapter's folder as its `root` (default: its name)."""

    def __post_init__(self) -> None:
        if self.roots is not None:
            self.roots = [os.path.realpath(os.path.expanduser(r)) for r in self.roots]

    def resolve(self, given: str) -> str:
        """The real folder `given` names, or a 403 when it lies outside every root. Symbolic links are
        followed first, so a link inside a root cannot lead outside it."""
        if "\0" in given:
            raise _not_allowed()
        real = os.path.realpath(os.path.expanduser(given))
        if self.roots is None:
            return real
        for root in self.roots:
            if real == root or real.startswith(root.rstrip(os.sep) + os.sep):
                return real
        raise _not_allowed()


def _not_allowed() -> APIError:
    return APIError(403, "lora_path is not inside a folder this server loads adapters from (the operator "
                         "sets them with --lora-dir and --allowed-lora-path).", type="permission_error",
                    code="lora_path_not_allowed", param="lora_path")


class LoadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoRARequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lora_name: str
    lora_int_id: int | None = None  # accepted for vLLM clients; the name decides


def adapter_cards(state) -> list[dict]:
    """/v1/models entries for the registered adapters: `parent` is the base model, `root` the adapter's
    name (its folder when the operator asked for paths)."""
    show = state.lora_policy.show_paths
    return [{"id": a.name, "object": "model", "created": state.created, "owned_by": "keel",
             "root": a.path if show else a.name, "parent": state.served_model_name,
             "max_model_len": state.client.info.max_model_len}
            for a in state.client.adapters.list()]


def _need_lora(state) -> None:
    if not state.client.adapters.enabled:
        raise APIError(400, "This server serves no LoRA adapters: start it with --enable-lora, --lora or --lora-dir.",
                       code="lora_disabled")
    if not state.allow_lora_updates:
        raise APIError(403, "Loading and unloading adapters at run time is turned off on this server "
                            "(--no-lora-updates).", type="permission_error", code="lora_updates_disabled")


@router.post("/load_lora_adapter", openapi_extra=documented(LoadLoRARequest))
async def load_lora_adapter(request: Request):
    body = await read_body(request, LoadLoRARequest)
    state = get_state(request)
    _need_lora(state)
    name = body.lora_name
    key = key_of(request)
    if key is not None and not key.allows(name):
        raise APIError(403, f"This API key may not load an adapter named `{shown(name)}`.", type="permission_error",
                       code="permission_denied", param="lora_name")
    try:
        check_adapter_name(name)
    except LoRAError as e:
        raise APIError(400, str(e), code="invalid_value", param="lora_name") from None
    if name in state.served_names():
        raise APIError(400, f"`{name}` is already the name of a model this server serves; give the adapter "
                            f"another name.", code="invalid_value", param="lora_name")
    adapters = state.client.adapters
    loop = asyncio.get_running_loop()
    path = state.lora_policy.resolve(body.lora_path)

    def load() -> None:
        if body.load_inplace:
            old = adapters.path_of(name)
            if old is not None and old != path:
                adapters.check_folder(name, path)  # a bad new folder leaves the old adapter in place
                adapters.remove(name)
        adapters.add(name, path)
    try:
        await loop.run_in_executor(None, load)
    except LoRAError as e:
        # quote the path as the client wrote it: the resolved one would show the server's layout
        msg = str(e).replace(path, body.lora_path)
        raise APIError(400, f"LoRA adapter `{name}` cannot be loaded: {msg}", code="invalid_lora_adapter",
                       param="lora_path") from None
    state.forget_fingerprint(name)
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/unload_lora_adapter", openapi_extra=documented(UnloadLoRARequest))
async def unload_lora_adapter(request: Request):
    body = await read_body(request, UnloadLoRARequest)
    state = get_state(request)
    _need_lora(state)
    key = key_of(request)
    try:
        if key is not None and not key.allows(body.lora_name):
            raise LoRANotFoundError(body.lora_name)  # another tenant's adapter: as if it did not exist
        state.client.adapters.remove(body.lora_name)
    except LoRANotFoundError:
        raise APIError(404, f"The LoRA adapter `{shown(body.lora_name)}` is not loaded.", code="lora_not_found",
                       param="lora_name") from None
    state.forget_fingerprint(body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
