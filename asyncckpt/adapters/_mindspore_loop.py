"""A MindSpore-style training loop for PyTorch: ``Model.train`` driving ``Callback`` objects.

It counts as MindSpore 2.10's ``Model.train`` (dataset not sunk) does::

    begin                         cur_epoch_num = 0, cur_step_num = 0
    for epoch in initial_epoch+1 .. epoch:
        epoch_begin               cur_epoch_num = epoch, cur_step_in_epoch = 0
        for batch:                cur_step_num += 1 (counted from 0 in every call, resumed
            step_begin                               or not),
                                  cur_step_in_epoch = (cur_step_num - 1) % batch_num + 1
            <train one step>
            step_end
        epoch_end
    end

so a ``ModelCheckpoint`` names, triggers and numbers its checkpoints as under MindSpore.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from types import TracebackType
from typing import Any, TypeVar

import torch

__all__ = ["Callback", "CallbackParam", "Model", "RunContext"]

_C = TypeVar("_C", bound="Callback")


class CallbackParam(dict[str, Any]):
    """The training state callbacks read: a dict whose keys are also attributes (MindSpore's
    ``_InternalCallbackParam``): ``train_network``, ``optimizer``, ``epoch_num``, ``batch_num``,
    ``cur_epoch_num``, ``cur_step_num``, ``cur_step_in_epoch``, ``net_outputs``,
    ``list_callback``, ..."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value


class RunContext:
    """What a callback is handed: the training state and a way to ask the loop to stop."""

    def __init__(self, original_args: Any) -> None:
        self._original_args = original_args
        self._stop_requested = False

    def original_args(self) -> Any:
        """The training state (a :class:`CallbackParam` in :class:`Model`)."""
        return self._original_args

    def request_stop(self) -> None:
        """Ask the training loop to stop after the current step."""
        self._stop_requested = True

    def get_stop_requested(self) -> bool:
        """Whether a callback asked the loop to stop."""
        return self._stop_requested


class Callback:
    """Base class of training callbacks; every hook does nothing unless overridden.

    :class:`Model` enters each callback as a context manager for the whole run (so it can release
    what it holds, even when training fails), then calls ``begin``, ``epoch_begin``,
    ``step_begin``, ``step_end``, ``epoch_end`` and ``end``, and ``on_train_exception`` when
    training raises.
    """

    def __enter__(self: _C) -> _C:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def begin(self, run_context: RunContext) -> None:
        """Called once before training."""

    def epoch_begin(self, run_context: RunContext) -> None:
        """Called at the start of every epoch."""

    def epoch_end(self, run_context: RunContext) -> None:
        """Called at the end of every epoch."""

    def step_begin(self, run_context: RunContext) -> None:
        """Called before every step."""

    def step_end(self, run_context: RunContext) -> None:
        """Called after every step."""

    def end(self, run_context: RunContext) -> None:
        """Called once after training."""

    def on_train_exception(self, run_context: RunContext, exc: BaseException) -> None:
        """Called when training raises ``exc``, before it propagates (not a MindSpore hook:
        MindSpore's ``Model`` special-cases ``ModelCheckpoint`` for ``exception_save``)."""


def _as_callbacks(callbacks: Callback | Sequence[Callback] | None) -> list[Callback]:
    if callbacks is None:
        return []
    items = [callbacks] if isinstance(callbacks, Callback) else list(callbacks)
    for item in items:
        if not isinstance(item, Callback):
            raise TypeError(f"callbacks must be Callback objects, got {type(item).__name__}")
    return items


def _dataset_size(dataset: Any) -> int:
    if hasattr(dataset, "get_dataset_size"):
        size = dataset.get_dataset_size()
    elif hasattr(dataset, "__len__"):
        size = len(dataset)
    else:
        raise TypeError("train_dataset must have get_dataset_size() or __len__")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"train_dataset must hold at least one batch, got size {size!r}")
    return size


class Model:
    """A minimal MindSpore-style ``Model.train`` loop for PyTorch, driving :class:`Callback` s.

    Each step unpacks a batch as ``(*inputs, label)`` and minimises
    ``loss_fn(network(*inputs), label)``; without ``loss_fn`` the network is called with the whole
    batch and returns the loss (MindSpore's ``WithLossCell``).

    Args:
        network: the module to train.
        loss_fn: ``loss_fn(output, label) -> scalar tensor``, or None.
        optimizer: a ``torch.optim.Optimizer``, or None (forward/backward only).
    """

    def __init__(
        self,
        network: torch.nn.Module,
        loss_fn: Callable[..., torch.Tensor] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        if not isinstance(network, torch.nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        self.network = network
        self.loss_fn = loss_fn
        self.optimizer = optimizer

    def _step(self, batch: Any) -> torch.Tensor:
        items = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        if self.loss_fn is None:
            loss = self.network(*items)
        else:
            *inputs, label = items
            loss = self.loss_fn(self.network(*inputs), label)
        if self.optimizer is not None:
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
        return loss

    def train(
        self,
        epoch: int,
        train_dataset: Iterable[Any],
        callbacks: Callback | Sequence[Callback] | None = None,
        initial_epoch: int = 0,
    ) -> None:
        """Train epochs ``initial_epoch + 1 .. epoch``, calling the callbacks' hooks.

        As in MindSpore 2.10, ``cur_epoch_num`` is the epoch's number (from ``initial_epoch +
        1``) and ``cur_step_num`` counts the steps of this call, from 1, also when resuming;
        ``epoch_num`` is the number of epochs this call trains.

        Raises:
            TypeError, ValueError: an argument is invalid.
        """
        for name, value, low in (("epoch", epoch, 1), ("initial_epoch", initial_epoch, 0)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        if epoch <= initial_epoch:
            raise ValueError(
                f"epoch ({epoch}) must be greater than initial_epoch ({initial_epoch})"
            )
        cbs = _as_callbacks(callbacks)
        batch_num = _dataset_size(train_dataset)
        params = CallbackParam(
            train_network=self.network, optimizer=self.optimizer, loss_fn=self.loss_fn,
            train_dataset=train_dataset, epoch_num=epoch - initial_epoch, batch_num=batch_num,
            cur_epoch_num=0, cur_step_num=0, cur_step_in_epoch=0, net_outputs=None,
            mode="train", list_callback=cbs,
        )
        run_context = RunContext(params)
        self.network.train()
        with ExitStack() as stack:
            for cb in cbs:
                stack.enter_context(cb)
            try:
                self._run(cbs, run_context, params, initial_epoch, epoch)
            except BaseException as exc:
                for cb in cbs:
                    cb.on_train_exception(run_context, exc)
                raise

    def _run(self, cbs: list[Callback], run_context: RunContext, params: CallbackParam,
             initial_epoch: int, epoch: int) -> None:
        for cb in cbs:
            cb.begin(run_context)
        for index in range(initial_epoch, epoch):
            params.cur_epoch_num = index + 1
            params.cur_step_in_epoch = 0
            for cb in cbs:
                cb.epoch_begin(run_context)
            for batch in params.train_dataset:
                params.cur_step_num += 1
                params.cur_step_in_epoch = (params.cur_step_num - 1) % params.batch_num + 1
                for cb in cbs:
                    cb.step_begin(run_context)
                params.net_outputs = self._step(batch)
                for cb in cbs:
                    cb.step_end(run_context)
                if run_context.get_stop_requested():
                    break
            for cb in cbs:
                cb.epoch_end(run_context)
            if run_context.get_stop_requested():
                break
        for cb in cbs:
            cb.end(run_context)
