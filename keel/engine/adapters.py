"""The engine's LoRA adapters behind one interface, whether LoRA is on or off.

Everything here is thread-safe (keel.lora.manager.LoRAManager holds its own lock): the server calls it
from request handlers while the engine thread steps.
"""

from __future__ import annotations

from keel.errors import LoRAError

LORA_OFF = "this engine serves no LoRA adapters: start it with LoRA enabled (enable_lora, --lora)"


class Adapters:
    def __init__(self, manager=None) -> None:
        """manager: keel.lora.manager.LoRAManager, or None when the engine serves the base model only."""
        self.manager = manager

    @property
    def enabled(self) -> bool:
        return self.manager is not None

    def _need(self):
        if self.manager is None:
            raise LoRAError(LORA_OFF)
        return self.manager

    def add(self, name: str, path: str) -> int:
        """Register an adapter folder and validate it now (LoRAError with the reason when it cannot be
        served); its weights load in the background. Returns its adapter id. Adding the same name and
        path again is a no-op; the same name with another path is an error."""
        return self._need().add(name, path)

    def register(self, name: str, path: str) -> int:
        """Register without reading the folder (for thousands of adapters); validated at first use."""
        return self._need().register(name, path)

    def register_dir(self, folder: str) -> list[str]:
        """Register every subfolder of `folder` that holds an adapter, named after the subfolder."""
        return self._need().register_dir(folder)

    def remove(self, name: str) -> None:
        """Unregister (LoRANotFoundError if unknown); requests already using it finish with it."""
        self._need().remove(name)

    def list(self) -> list:
        """keel.lora.manager.LoRAInfo for every registered adapter ([] when LoRA is off)."""
        return [] if self.manager is None else self.manager.list()

    def validate(self, name: str) -> int:
        """Validate a registered adapter (reads its config and safetensors header, not its weights) and
        return its id; call it off the engine thread before adding a request so the check never stalls
        a step."""
        return self._need().resolve(name)

    def check_folder(self, name: str, path: str) -> None:
        """Validate a folder as adapter `name` without registering it (LoRAError when it cannot be served)."""
        self._need().check_folder(name, path)

    def path_of(self, name: str) -> str | None:
        """The folder of a registered adapter; None when no adapter has that name (or LoRA is off)."""
        return None if self.manager is None else self.manager.path_of(name)

    @property
    def store_dtype(self):
        """The dtype adapter weights are kept in (part of an adapter's fingerprint)."""
        return self._need().store_dtype

    @property
    def config(self):
        """keel.config.LoRAConfig (None when LoRA is off)."""
        return None if self.manager is None else self.manager.config

    def resolve(self, name: str | None, adapter_id: int | None) -> int | None:
        """The adapter id a request names, by name or id; None for the base model."""
        if name is None and adapter_id is None:
            return None
        lora = self._need()
        if name is not None:
            aid = lora.resolve(name)
            if adapter_id is not None and adapter_id != aid:
                raise LoRAError(f"adapter {name!r} has id {aid}, not {adapter_id}")
            return aid
        return lora.check_id(adapter_id)
