"""Adapters by name, in three tiers: registered (a path on disk, thousands are fine), loaded in host
memory (at most max_cpu_loras, LRU) and resident in the slots next to the weights (at most max_loras, LRU,
never one a running request uses).

Threads: registering, validating and listing may run on any thread (the server's); weights are read
from disk on one background loader thread, so a step never waits on a load and a request is never
held up by another adapter's load; the resident slots are touched only by the engine thread, between
steps (`prepare_step`). One condition variable guards everything the threads share.

Each registered name gets a fresh integer adapter id, never reused: the id is part of the prefix-cache
key, so re-registering a name with new weights cannot hit the old adapter's cached blocks.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections import OrderedDict, deque
from dataclasses import dataclass

import torch

from keel.config import LoRAConfig
from keel.errors import LoRAError, LoRANotFoundError
from keel.lora.adapter import AdapterSpec, BaseTargets, check_adapter_name, load_weights, read_spec
from keel.lora.layers import KERNEL_MAX_ROWS, LinearLoRA, LoRACosts, lora_store_dtype, rank_groups

log = logging.getLogger("keel.lora")


@dataclass
class LoRAInfo:
    """One registered adapter, as /v1/models lists it."""
    name: str
    path: str
    adapter_id: int
    validated: bool  # its folder passed validation (registered-only adapters are validated at first use)
    in_host: bool  # its weights are loaded in host memory
    resident: bool  # it occupies a slot next to the model weights


@dataclass
class StepPlan:
    positions: dict[int, int]  # adapter id -> resident slot; the step's adapters hold slots 0..S-1
    groups: list[tuple[int, int]]  # slot ranges computed at one rank each (see layers.rank_groups)


class _Entry:
    def __init__(self, name: str, path: str, adapter_id: int) -> None:
        self.name, self.path, self.adapter_id = name, path, adapter_id
        self.spec: AdapterSpec | None = None
        self.refs = 0  # unfinished requests using it
        self.removed = False
        self.load_error: LoRAError | None = None


class LoRAManager:
    def __init__(self, model: torch.nn.Module, config: LoRAConfig, dtype: torch.dtype, device: torch.device,
                 served_model: str | None = None) -> None:
        self.config = config
        self.max_loras = config.max_loras
        self.max_cpu_loras = config.cpu_loras
        self.dtype, self.device = dtype, device
        from keel.kernels.backend import of
        self.backend = of(model)
        self.store_dtype = lora_store_dtype(config.lora_dtype, dtype, device, self.backend)
        # keel's kernel for every slot on a batch-invariant backend; else MKL for slots of many tokens
        self.kernel_max_rows = self.backend.max_rows(KERNEL_MAX_ROWS)
        self.fold_scale = self.store_dtype == dtype
        self.served_model = served_model if config.check_base_model else None
        self.base = BaseTargets(model)
        modules = dict(model.named_modules())
        self.layers: dict[str, LinearLoRA] = {}
        for t in self.base.targets.values():
            if t.module not in self.layers:
                lin = modules[t.module]
                sizes = list(lin.output_sizes.values()) if lin.output_sizes else [lin.out_features]
                lin.lora = self.layers[t.module] = LinearLoRA(
                    lin.in_features, sizes, config.max_loras, config.max_lora_rank, dtype, device, self.store_dtype,
                    self.backend)
        # every (Hugging Face module name, layer, shard) an adapter may adapt
        self._targets = [(hf, self.layers[t.module], t.shard) for hf, t in self.base.targets.items()]
        self.costs = LoRACosts.for_model(
            sum(t.in_features + t.out_features for t in self.base.targets.values()), len(self.layers),
            config.max_lora_rank, torch.empty((), dtype=self.store_dtype).element_size())

        self._cv = threading.Condition()
        self._by_name: dict[str, _Entry] = {}
        self._by_id: dict[int, _Entry] = {}  # removed entries stay until their last request ends
        self._ids = itertools.count(1)
        self._host: OrderedDict[int, dict] = OrderedDict()  # LRU: adapter id -> loaded weights
        self._wanted: set[int] = set()  # asked for by the scheduler and not yet resident: not evicted from host
        self._queue: deque[int] = deque()  # loads to do, oldest request first
        self._prefetch: set[int] = set()  # queued only as a prefetch: dropped rather than evict anything
        self._loading: int | None = None
        self._failures: dict[int, LoRAError] = {}
        self._thread: threading.Thread | None = None

        # Resident slots: engine thread only (read by the loader under the lock).
        self.slot_adapter: list[int | None] = [None] * config.max_loras
        self.slot_of: dict[int, int] = {}
        self._slot_used = [0] * config.max_loras  # step of last use, for LRU
        self._step = 0
        self.num_disk_loads = 0  # adapters read from disk
        self.num_slot_loads = 0  # adapters copied into a slot
        self.num_slot_moves = 0  # slot moves to keep a step's adapters at slots 0..S-1
        self.peak_host = 0

    # -- registry (any thread) ---------------------------------------------------------------
    def register(self, name: str, path: str) -> int:
        """Register without reading anything; the folder is validated at its first use."""
        check_adapter_name(name)
        path = os.path.realpath(os.path.expanduser(str(path)))
        with self._cv:
            old = self._by_name.get(name)
            if old is not None:
                if old.path == path:
                    return old.adapter_id
                raise LoRAError(f"adapter {name!r} is already registered with another folder; unload it first")
            entry = _Entry(name, path, next(self._ids))
            self._by_name[name] = entry
            self._by_id[entry.adapter_id] = entry
            return entry.adapter_id

    def add(self, name: str, path: str) -> int:
        """Register and validate now (raises LoRAError with the reason), then load in the background."""
        with self._cv:
            existed = name in self._by_name
        aid = self.register(name, path)
        try:
            self._validate(self._by_id[aid])
        except LoRAError:
            if not existed:
                self.remove(name)
            raise
        with self._cv:
            if len(self._host) + (self._loading is not None) < self.max_cpu_loras and aid not in self._host:
                self._enqueue(aid, prefetch=True)
        return aid

    def check_folder(self, name: str, path: str) -> None:
        """Validate an adapter folder as `add` would (LoRAError with the reason), registering nothing."""
        read_spec(name, os.path.realpath(os.path.expanduser(str(path))), self.base, self.config.max_lora_rank,
                  self.served_model)

    def register_dir(self, folder: str) -> list[str]:
        """Every subfolder holding an adapter_config.json, registered under the subfolder's name."""
        if not os.path.isdir(folder):
            raise LoRAError(f"LoRA folder {folder!r} does not exist")
        names = []
        for sub in sorted(os.listdir(folder)):
            path = os.path.join(folder, sub)
            if os.path.isfile(os.path.join(path, "adapter_config.json")):
                try:
                    check_adapter_name(sub)
                except LoRAError as e:
                    log.warning("skipping %s: %s", path, e)
                    continue
                self.register(sub, path)
                names.append(sub)
        return names

    def remove(self, name: str) -> None:
        """Unregister now; requests already using it finish with it, then its memory is freed."""
        with self._cv:
            entry = self._by_name.pop(name, None)
            if entry is None:
                raise LoRANotFoundError(f"adapter {name!r} is not registered")
            entry.removed = True
            if entry.refs == 0:
                self._drop(entry)

    def _drop(self, entry: _Entry) -> None:
        self._by_id.pop(entry.adapter_id, None)
        self._host.pop(entry.adapter_id, None)
        self._wanted.discard(entry.adapter_id)
        self._failures.pop(entry.adapter_id, None)
        self._cv.notify_all()  # the slot is freed by the engine thread at its next step

    def list(self) -> list[LoRAInfo]:
        with self._cv:
            return [LoRAInfo(e.name, e.path, e.adapter_id, e.spec is not None, e.adapter_id in self._host,
                             e.adapter_id in self.slot_of) for e in self._by_name.values()]

    def path_of(self, name: str) -> str | None:
        """The folder of a registered adapter (None: not registered)."""
        with self._cv:
            entry = self._by_name.get(name)
            return None if entry is None else entry.path

    def resolve(self, name: str) -> int:
        """The id of a registered adapter, validating it on first use (LoRANotFoundError, LoRAError)."""
        with self._cv:
            entry = self._by_name.get(name)
        if entry is None:
            raise LoRANotFoundError(f"adapter {name!r} is not registered")
        self._validate(entry)
        return entry.adapter_id

    def check_id(self, adapter_id: int) -> int:
        with self._cv:
            entry = self._by_id.get(adapter_id)
        if entry is None or entry.removed:
            raise LoRANotFoundError(f"adapter id {adapter_id!r} is not registered")
        self._validate(entry)
        return adapter_id

    def name_of(self, adapter_id: int) -> str | None:
        entry = self._by_id.get(adapter_id)
        return None if entry is None else entry.name

    def _validate(self, entry: _Entry) -> None:
        # Outside the lock: it reads files, and the engine thread must not wait on it.
        if entry.spec is None:
            spec = read_spec(entry.name, entry.path, self.base, self.config.max_lora_rank, self.served_model)
            with self._cv:
                entry.spec = spec

    def acquire(self, adapter_id: int) -> None:
        with self._cv:
            entry = self._by_id[adapter_id]
            entry.refs += 1
            if entry.refs == 1:
                entry.load_error = None  # a failed earlier load (a prefetch, say) is tried again

    def release(self, adapter_id: int) -> None:
        with self._cv:
            entry = self._by_id.get(adapter_id)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs == 0:
                self._wanted.discard(adapter_id)
                self._failures.pop(adapter_id, None)
                entry.load_error = None  # a later request tries the files again
                if entry.removed:
                    self._drop(entry)
                self._cv.notify_all()

    # -- host tier and the loader thread -----------------------------------------------------
    def is_ready(self, adapter_id: int) -> bool:
        """For the scheduler: True when the adapter can be made resident without touching the disk;
        otherwise its load is queued (it becomes ready later) and False is returned."""
        with self._cv:
            if adapter_id in self.slot_of:
                return True
            entry = self._by_id.get(adapter_id)
            if entry is None or entry.load_error is not None:
                return False
            self._wanted.add(adapter_id)
            if adapter_id in self._host:
                self._host.move_to_end(adapter_id)
                return True
            self._prefetch.discard(adapter_id)
            if adapter_id not in self._queue and adapter_id != self._loading:
                self._enqueue(adapter_id)
            return False

    def _enqueue(self, adapter_id: int, prefetch: bool = False) -> None:
        self._queue.append(adapter_id)
        if prefetch:
            self._prefetch.add(adapter_id)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loader, name="keel-lora-loader", daemon=True)
            self._thread.start()
        self._cv.notify_all()

    def pop_load_failures(self) -> dict[int, LoRAError]:
        """Adapters whose weights failed to load since the last call (their requests cannot run)."""
        with self._cv:
            failures, self._failures = self._failures, {}
            return failures

    def wait_for_loads(self, timeout: float) -> None:
        """Block until a load finishes (or timeout) when one is pending: for a step that has nothing to run."""
        with self._cv:
            if self._queue or self._loading is not None:
                self._cv.wait(timeout)

    def _next_load(self) -> int | None:
        """Under the lock: the next adapter to read, making room in host memory for it; None to wait."""
        while self._queue:
            aid = self._queue[0]
            if aid not in self._by_id or aid in self._host or aid in self.slot_of:
                self._queue.popleft()
                self._prefetch.discard(aid)
                continue
            if len(self._host) >= self.max_cpu_loras:
                victim = next((a for a in self._host if a not in self._wanted), None)
                if victim is None:
                    if aid in self._prefetch:  # a prefetch never pushes out a wanted adapter
                        self._queue.popleft()
                        self._prefetch.discard(aid)
                        continue
                    return None
                del self._host[victim]
            self._queue.popleft()
            self._prefetch.discard(aid)
            return aid
        return None

    def _loader(self) -> None:
        while True:
            with self._cv:
                aid = self._next_load()
                while aid is None:
                    self._cv.wait()
                    aid = self._next_load()
                entry = self._by_id[aid]
                self._loading = aid
            try:
                weights, error = load_weights(entry.spec, self.store_dtype, self.fold_scale), None
            except LoRAError as e:
                weights, error = None, e
            except Exception as e:  # never let the loader thread die: report it as that adapter's error
                weights, error = None, LoRAError(f"LoRA adapter {entry.name!r}: loading failed: {e}")
            with self._cv:
                self._loading = None
                if error is not None:
                    log.error("%s", error)
                    entry.load_error = error
                    if entry.refs:
                        self._failures[aid] = error
                elif aid in self._by_id:
                    self._host[aid] = weights
                    self.num_disk_loads += 1
                    self.peak_host = max(self.peak_host, len(self._host))
                self._cv.notify_all()

    @property
    def num_in_host(self) -> int:
        return len(self._host)

    @property
    def num_resident(self) -> int:
        return len(self.slot_of)

    def resident_bytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers.values())

    # -- resident slots (engine thread, between steps) ---------------------------------------
    def prepare_step(self, active: list[int], in_use: set[int]) -> StepPlan:
        """Make the step's S adapters resident at slots 0..S-1, largest rank first.

        active: adapters of the step's requests; in_use: adapters of all running requests (never
        evicted). The scheduler keeps in_use within max_loras and only schedules ready adapters.
        Each rank gets a range of slots; an adapter already inside its range stays, so a steady batch
        moves nothing and a new adapter moves at most itself and the one it swaps with."""
        self._step += 1
        with self._cv:
            for slot, aid in enumerate(self.slot_adapter):
                if aid is not None and aid not in self._by_id:  # removed and no longer used
                    self.slot_adapter[slot] = None
                    del self.slot_of[aid]
            rank = {aid: self._by_id[aid].spec.max_rank for aid in active}
        region, start = {}, 0
        for r in sorted(set(rank.values()), reverse=True):
            n = sum(1 for a in active if rank[a] == r)
            region[r], start = range(start, start + n), start + n
        keep = set(active) | set(in_use)
        for aid in active:
            if aid not in self.slot_of:
                self._load_slot(aid, self._free_slot(keep, region[rank[aid]]), self._by_id[aid].spec)
        placed = {a for a in active if self.slot_of[a] in region[rank[a]]}
        for aid in active:
            if aid not in placed:
                target = next(t for t in region[rank[aid]] if self.slot_adapter[t] not in placed)
                self._move(self.slot_of[aid], target)
                placed.add(aid)
        by_slot = sorted(active, key=self.slot_of.get)
        for s in range(len(by_slot)):
            self._slot_used[s] = self._step
        return StepPlan({a: self.slot_of[a] for a in active}, rank_groups([rank[a] for a in by_slot], self.costs))

    def _free_slot(self, keep: set[int], wanted: range) -> int:
        """A slot for a new adapter: empty before evicting, inside `wanted` (its rank's range) before elsewhere."""
        empty = [s for s, a in enumerate(self.slot_adapter) if a is None]
        for s in empty:
            if s in wanted:
                return s
        if empty:
            return empty[0]
        evictable = [s for s, a in enumerate(self.slot_adapter) if a not in keep]
        assert evictable, f"more than max_loras={self.max_loras} adapters in use: the scheduler's budget failed"
        slot = min(evictable, key=lambda s: (self._slot_used[s], s not in wanted))  # least recently used
        with self._cv:
            del self.slot_of[self.slot_adapter[slot]]
            self.slot_adapter[slot] = None
            self._cv.notify_all()
        return slot

    def _load_slot(self, aid: int, slot: int, spec: AdapterSpec) -> None:
        with self._cv:
            weights = self._host.get(aid)
            if weights is not None:
                self._host.move_to_end(aid)
        if weights is None:  # evicted between the scheduler's check and now: read it here
            log.warning("adapter %s was not in host memory at its step; reading it from disk", spec.name)
            weights = load_weights(spec, self.store_dtype, self.fold_scale)
            self.num_disk_loads += 1
        for hf, layer, shard in self._targets:
            a_bt = weights.get(hf)
            layer.set_slot(slot, shard, *(a_bt if a_bt is not None else (None, None, 1.0)))
        with self._cv:
            self.slot_of[aid] = slot
            self.slot_adapter[slot] = aid
            self._wanted.discard(aid)
            self.num_slot_loads += 1
            self._cv.notify_all()

    def _move(self, src: int, dst: int) -> None:
        other = self.slot_adapter[dst]
        for layer in self.layers.values():
            layer.move_slot(src, dst, swap=other is not None)
        with self._cv:
            aid = self.slot_adapter[src]
            self.slot_adapter[dst], self.slot_of[aid] = aid, dst
            self.slot_adapter[src] = other
            if other is not None:
                self.slot_of[other] = src
            self._slot_used[src], self._slot_used[dst] = self._slot_used[dst], self._slot_used[src]
        self.num_slot_moves += 1
