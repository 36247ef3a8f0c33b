"""The LoRA adapters an engine holds, by name: each gets a slot in the model's low-rank paths
(ember.layers.lora) and a unique id that salts its sequences' prefix-cache keys.

Loading reads and checks the files first (any thread) and then registers the adapter (the engine thread, between
steps: AsyncEngine runs it there). An adapter that running or waiting sequences use cannot be unloaded: `unload`
refuses (LoraInUse) rather than change a sequence's model under it.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ember.engine.lora_spec import LoraSpec, check_name
from ember.errors import InvalidParameter, LoraError, LoraInUse, LoraNotFound
from ember.layers.lora import LoraLayers, attach_lora
from ember.loader.dtypes import resolve_lora_dtype_name
from ember.loader.lora import LoraWeights, read_lora

if TYPE_CHECKING:
    from ember.loader.model import LoadedModel

MAX_ADAPTERS = 64


@dataclass(eq=False)
class Adapter:
    weights: LoraWeights
    slot: int
    uid: int  # never reused: a name loaded again gets a new one (its old cached prefixes are not reused)
    users: set[str] = field(default_factory=set)  # request ids of the sequences using it

    @property
    def name(self) -> str:
        return self.weights.name


class LoraRegistry:
    def __init__(self, loaded: LoadedModel, lora_dtype: str = "auto"):
        self.loaded = loaded
        name = resolve_lora_dtype_name(lora_dtype, str(loaded.dtype).removeprefix("torch."), loaded.device.type)
        self.dtype: torch.dtype = getattr(torch, name)  # what the adapters' A and B are held in
        self.adapters: dict[str, Adapter] = {}
        self._layers: LoraLayers | None = None  # the model is wrapped on the first load
        self._uids = itertools.count(1)

    @property
    def layers(self) -> LoraLayers | None:
        return self._layers

    @property
    def nbytes(self) -> int:
        return sum(a.weights.nbytes for a in self.adapters.values())

    def read(self, spec: LoraSpec) -> LoraWeights:
        """Read and check an adapter's files for this model (no engine state touched: any thread)."""
        check_name(spec.name)
        if spec.name == self.loaded.name:
            raise LoraError(f"lora_name {spec.name!r} is the base model's name")
        if not Path(spec.path).exists():
            raise LoraError(f"adapter {spec.name!r}: {spec.path} does not exist")
        return read_lora(spec.name, spec.path, self.loaded.model, self.dtype, self.loaded.device, spec.scale)

    def add(self, weights: LoraWeights) -> Adapter:
        """Register read weights (on the engine thread)."""
        if weights.name in self.adapters:
            raise LoraError(f"an adapter named {weights.name!r} is already loaded")
        if len(self.adapters) >= MAX_ADAPTERS:
            raise LoraError(f"at most {MAX_ADAPTERS} adapters can be loaded at once")
        if self._layers is None:
            self._layers = attach_lora(self.loaded.model)
        used = {a.slot for a in self.adapters.values()}
        slot = next(s for s in itertools.count(1) if s not in used)
        self._layers.add(slot, weights.pairs)
        weights.pairs = {}  # the layers hold them now (stacked): one copy in memory, as the estimator counts
        adapter = self.adapters[weights.name] = Adapter(weights, slot, next(self._uids))
        return adapter

    def load(self, spec: LoraSpec) -> Adapter:
        return self.add(self.read(spec))

    def unload(self, name: str) -> None:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise LoraNotFound(f"no LoRA adapter named {name!r} is loaded")
        if adapter.users:
            raise LoraInUse(f"adapter {name!r} is used by {len(adapter.users)} running request(s); "
                            "unload it once they have finished")
        del self.adapters[name]
        self._layers.remove(adapter.slot)

    def get(self, name: str) -> Adapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            known = ", ".join(sorted(self.adapters)) or "none loaded"
            raise InvalidParameter("lora", f"unknown LoRA adapter {name!r} (loaded: {known})")
        return adapter
