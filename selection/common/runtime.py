"""What the long-running core steps (warmup, gradient features, kMQ runs) are handed by their caller.

They read and record as they go (per chunk, per checkpoint) and load the model only once their
inputs have passed their checks, so they take these handles rather than their results. The
orchestration's resources and loggers satisfy them; the core never imports the orchestration.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:  # a type only: common/ must not load the model code (and torch)
    from selection.train.models import ModelSpec


class Connect(Protocol):
    """Opens a short-lived lineage connection (DuckDB), e.g. ``LineageStore.connect``."""

    def __call__(self) -> AbstractContextManager[Any]: ...


class ModelLoader(Protocol):
    def load(self, spec: ModelSpec, device: str) -> tuple[Any, Any]:
        """(model, tokenizer) of ``spec`` on ``device``."""
        ...


class Device(Protocol):
    batch_size: int  # examples per forward pass
    max_tokens_per_batch: int

    def resolve(self) -> str:
        """The torch device to use (``cpu``, ``cuda``, ``cuda:N``)."""
        ...

    def projection_cache_bytes(self, device: str) -> int:
        """Memory an ``exact`` projector may keep its dense matrix in."""
        ...


class Log(Protocol):
    def info(self, msg: str) -> None: ...

    def warning(self, msg: str) -> None: ...
