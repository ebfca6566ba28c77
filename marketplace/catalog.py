"""The model catalog (`config/models.yaml`): models, devices, queues and prices."""
from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, model_validator

from marketplace.infra import names

Device = Literal["cpu", "gpu"]
InputKind = Literal["json", "text", "file"]
CONTROL_QUEUES = names.CONTROL_QUEUES  # the control plane's, beside the catalog's `<device>.<model>`


class Price(BaseModel):
    start_fee: Decimal
    per_second: Decimal
    per_item: Decimal
    failed: Literal["full", "start_fee", "nothing"] = "start_fee"


class ModelSpec(BaseModel):
    name: str
    description: str = ""
    input: InputKind
    devices: list[Device]
    batch_size: int = Field(gt=0)
    # Items per subtask for a job sent to `device: gpu` (a GPU wants bigger batches than a CPU
    # core); `any` keeps `batch_size`, since subtasks are cut before a device is chosen.
    gpu_batch_size: int | None = Field(default=None, gt=0)
    max_batch_size: int = Field(gt=0)
    time_limit: float = Field(gt=0)
    params: dict[str, Any] = {}
    price: dict[Device, Price]
    # Built-in models may share another model's queue (`echo` rides on `cpu.generic`).
    queue_model: str | None = None
    # Python modules a node needs to run it (torchvision cannot live beside the CPU torch of
    # `.venv`: resnet50 nodes run from `.venv-vision`).
    requires: list[str] = []

    @model_validator(mode="after")
    def _batches_fit(self) -> ModelSpec:
        for size in (self.batch_size, self.gpu_batch_size):
            if size is not None and size > self.max_batch_size:
                raise ValueError(f"batch size {size} is above max_batch_size {self.max_batch_size}")
        return self

    def default_batch_size(self, device: str) -> int:
        """Items per subtask when the request names none, for the requested device (`any`, `cpu`, `gpu`)."""
        return self.gpu_batch_size if device == "gpu" and self.gpu_batch_size else self.batch_size

    def queue(self, device: Device) -> str:
        return f"{device}.{self.queue_model or self.name}"

    @property
    def queues(self) -> list[str]:
        return [self.queue(d) for d in self.devices]

    def candidate_queues(self, device: str) -> list[str]:
        """Queues a task asking for `device` (`any`, `cpu`, `gpu`) may use, best first: `any`
        prefers GPU, then CPU; a device the model does not run on has none."""
        if device == "any":
            devices = [d for d in ("gpu", "cpu") if d in self.devices]
        elif device in self.devices:
            devices = [device]
        else:
            devices = []
        return [self.queue(d) for d in devices]  # type: ignore[arg-type]


class Catalog(BaseModel):
    models: dict[str, ModelSpec]

    def get(self, name: str) -> ModelSpec | None:
        return self.models.get(name)

    def time_limit(self, name: str) -> float:
        """The model's hard time limit; a task whose model left the catalog gets the longest default."""
        spec = self.models.get(name)
        return float(spec.time_limit) if spec else 600.0

    @property
    def queues(self) -> list[str]:
        return sorted({q for spec in self.models.values() for q in spec.queues})

    def models_for_queue(self, queue: str) -> list[str]:
        return [spec.name for spec in self.models.values() if queue in spec.queues]

    def missing_modules(self, model: str) -> list[str]:
        """The modules `model` needs that this Python cannot find (none are imported)."""
        import importlib.util

        spec = self.models.get(model)
        return [name for name in (spec.requires if spec else []) if importlib.util.find_spec(name) is None]


def parse_catalog(raw: dict[str, Any]) -> Catalog:
    models = {name: ModelSpec(name=name, **body) for name, body in (raw.get("models") or {}).items()}
    return Catalog(models=models)


@lru_cache(maxsize=4)
def load_catalog(path: Path) -> Catalog:
    """Read and validate the catalog file (cached per path)."""
    with open(path, encoding="utf-8") as fh:
        return parse_catalog(yaml.safe_load(fh))


def get_catalog() -> Catalog:
    from marketplace.settings import get_settings

    return load_catalog(get_settings().catalog_path)
