"""States to checkpoint: the layouts the benchmark measures, built to a target size."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["BenchState", "make_mlp", "make_state", "state_nbytes"]

_FEW_BIG = 64 * 2**20  # bytes per tensor in the "few-big" layout
_MANY_SMALL = 256 * 2**10  # bytes per tensor in the "many-small" layout
_TINY_MANY = 64  # bytes per tensor in the "tiny-many" layout (16 float32: an embedding row)


@dataclass(eq=False)
class BenchState:
    """A state to save and what it is.

    Attributes:
        layout: the layout name.
        tree: the state as every contender receives it (dicts of tensors and plain values).
        nbytes: bytes of tensor data in ``tree``.
        tensors: number of tensors in ``tree``.
        owner: objects the tree was taken from (the model and optimizer), kept alive.
        objects: what a contender that snapshots through ``state_dict()`` saves instead of
            ``tree`` (the same bytes): the model and optimizer themselves, so that a
            pipelined snapshot has an optimizer to guard. None: ``tree`` only.
    """

    layout: str
    tree: dict[str, Any]
    nbytes: int
    tensors: int
    owner: tuple[object, ...] = ()
    objects: dict[str, Any] | None = None


def state_nbytes(tree: object) -> tuple[int, int]:
    """``(bytes, count)`` of the distinct tensor storages in a nested state."""
    seen: dict[int, int] = {}
    count = 0
    stack = [tree]
    while stack:
        obj = stack.pop()
        if isinstance(obj, torch.Tensor):
            count += 1
            storage = obj.untyped_storage()
            seen[storage.data_ptr() or id(storage)] = storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple)):
            stack.extend(obj)
    return sum(seen.values()), count


def make_mlp(params: int, device: torch.device) -> torch.nn.Sequential:
    """An MLP of square ``Linear`` layers with about ``params`` parameters (at least one layer)."""
    width = max(16, int(math.sqrt(params / 8)) // 16 * 16)
    layers = max(1, round(params / (width * width + width)))
    modules: list[torch.nn.Module] = []
    for i in range(layers):
        modules.append(torch.nn.Linear(width, width))
        if i + 1 < layers:
            modules.append(torch.nn.ReLU())
    return torch.nn.Sequential(*modules).to(device)


def _model_state(nbytes: int, device: torch.device) -> BenchState:
    # float32 parameters plus Adam's exp_avg and exp_avg_sq: 12 bytes per parameter.
    model = make_mlp(max(1, nbytes // 12), device)
    optim = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optim.step()  # creates the Adam state
    optim.zero_grad(set_to_none=True)
    tree = {"model": model.state_dict(), "optim": optim.state_dict(), "step": 1}
    size, count = state_nbytes(tree)
    return BenchState("model", tree, size, count, (model, optim),
                      {"model": model, "optim": optim, "step": 1})


def _tensors_state(layout: str, nbytes: int, each: int, device: torch.device,
                   generator: torch.Generator) -> BenchState:
    each = min(each, nbytes)
    tree: dict[str, Any] = {}
    left = nbytes
    i = 0
    while left >= 4:
        numel = min(each, left) // 4
        t = torch.empty(numel, dtype=torch.float32)
        t.uniform_(generator=generator)  # touched and incompressible
        tree[f"t{i:05d}"] = t.to(device)
        left -= numel * 4
        i += 1
    size, count = state_nbytes(tree)
    return BenchState(layout, tree, size, count)


def make_state(layout: str, nbytes: int, *, device: str = "cpu", seed: int = 0) -> BenchState:
    """Build a state of about ``nbytes`` bytes in ``layout`` on ``device``.

    Raises:
        ValueError: unknown layout.
    """
    torch.manual_seed(seed)
    dev = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    if layout == "model":
        return _model_state(nbytes, dev)
    if layout == "few-big":
        return _tensors_state(layout, nbytes, _FEW_BIG, dev, generator)
    if layout == "many-small":
        return _tensors_state(layout, nbytes, _MANY_SMALL, dev, generator)
    if layout == "tiny-many":
        return _tiny_state(nbytes, dev, generator)
    raise ValueError(f"unknown layout {layout!r}; choose model, few-big, many-small or tiny-many")


def _tiny_state(nbytes: int, device: torch.device, generator: torch.Generator) -> BenchState:
    """One tensor of 16 floats per 64 bytes, each its own storage (a table split per row)."""
    count = max(1, nbytes // _TINY_MANY)
    rows = torch.empty(count, _TINY_MANY // 4).uniform_(generator=generator)
    tree: dict[str, Any] = {f"r{i:07d}": row.clone().to(device) for i, row in enumerate(rows)}
    size, n = state_nbytes(tree)
    return BenchState("tiny-many", tree, size, n)
