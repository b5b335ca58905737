"""Writer configuration: one frozen, validated dataclass shared by every front door and adapter."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args

import torch

from .._format.best import (
    DEFAULT_GREATER_KEYS,
    DEFAULT_LESS_KEYS,
    BestMetric,
    Mode,
    infer_mode,
    normalize_best,
)
from .._format.crypto import Encryption
from .._format.naming import FilenameTemplate, check_series
from .._snapshot.snapshot import SnapshotMode

__all__ = [
    "DEFAULT_GREATER_KEYS",
    "DEFAULT_LESS_KEYS",
    "BestMetric",
    "CheckpointerConfig",
    "ExtraTypes",
    "Mode",
    "OnException",
    "Reducer",
    "SnapshotMode",
    "WhenFull",
    "infer_mode",
    "normalize_best",
]

WhenFull = Literal["block", "skip", "coalesce"]
OnException = Literal["drain", "abandon"]
#: A copyreg-style reduce function: ``obj -> (callable, args[, state, ...])`` (see ``copyreg``).
Reducer = Callable[[Any], tuple[Any, ...]]
#: Normalized ``extra_types``: ``((cls, reducer or None), ...)``.
ExtraTypes = tuple[tuple[type, "Reducer | None"], ...]

def _positive_int(value: object, name: str, *, allow_none: bool = True) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


# Types the snapshot walks or copies itself; listing them would change how every state is stored.
_BUILTIN_TYPES = frozenset(
    {dict, OrderedDict, list, tuple, str, bytes, int, float, bool, complex, type(None),
     torch.Tensor, torch.nn.Parameter}
)


def normalize_extra_types(extra: object) -> ExtraTypes:
    """Turn ``extra_types=`` (classes, a mapping class -> reducer/None, or (class, reducer)
    pairs) into pairs.

    Raises:
        TypeError: an item is not a class, a reducer is not callable, or the argument has the
            wrong shape.
        ValueError: a class is given twice, or is one the snapshot already handles itself.
    """
    if extra is None:
        return ()
    pairs: list[tuple[object, object]]
    if isinstance(extra, Mapping):
        pairs = list(extra.items())
    elif isinstance(extra, Iterable) and not isinstance(extra, (str, bytes)):
        # (class, reducer) pairs: the normalized form, which dataclasses.replace() passes back
        pairs = [item if isinstance(item, tuple) and len(item) == 2 else (item, None)
                 for item in extra]
    else:
        raise TypeError(
            "extra_types must be a list of classes or a mapping {class: reducer or None}, "
            f"got {type(extra).__name__}"
        )
    out: list[tuple[type, Reducer | None]] = []
    for cls, reducer in pairs:
        if not isinstance(cls, type):
            raise TypeError(f"extra_types: expected a class, got {cls!r:.60}")
        if cls in _BUILTIN_TYPES:
            raise ValueError(
                f"extra_types: {cls.__qualname__} is already handled by the snapshot itself"
            )
        if any(cls is seen for seen, _ in out):
            raise ValueError(f"extra_types: {cls.__qualname__} is given twice")
        if reducer is not None and not callable(reducer):
            raise TypeError(
                f"extra_types[{cls.__qualname__}]: the reducer must be callable or None, "
                f"got {type(reducer).__name__}"
            )
        out.append((cls, reducer))
    return tuple(out)


@dataclass(frozen=True)
class CheckpointerConfig:
    """Everything a writer is configured with. Front doors build it from their keyword arguments.

    Args:
        filename: template for checkpoint names, fields ``{step}`` and ``{epoch}``.
        queue_size: snapshots that may wait while one is being written (>= 1). Peak snapshot
            memory is ``(queue_size + 1) x state size``.
        when_full: what ``save()`` does when ``queue_size`` snapshots already wait: ``"block"``
            until one is written, ``"skip"`` this save (counted, an event is emitted), or
            ``"coalesce"`` (drop the oldest waiting snapshot in favour of this one).
        keep_last: keep the newest N checkpoints (None: no limit from this rule).
        keep_every_n_minutes: keep the first checkpoint of every M-minute window (MindSpore's
            ``keep_checkpoint_per_n_minutes``), counted from the first checkpoint in the folder.
        keep_period: keep checkpoints whose step is a multiple of K forever (Orbax's
            ``keep_period``). Only meaningful together with a limiting rule above.
        best: metrics with a best pointer (see :func:`normalize_best`); a checkpoint that a best
            pointer names is never deleted while it is the best.
        last_checkpoint: also maintain mmengine's ``last_checkpoint`` file.
        on_exception: leaving the ``with`` block by an exception ``"drain"``s the queue (default)
            or ``"abandon"``s it (in-flight work is cancelled; nothing half-written is left).
        max_retries: how many times a transient storage failure is retried (0: never).
        retry_backoff: base of the exponential backoff between retries, in seconds.
        torch_crc32: also compute torch's own per-record CRC32 inside the file. Off by default:
            asyncckpt checksums the whole file with xxh3-128 while streaming it, and
            ``torch.load`` reads files without the CRC.
        snapshot: how the state is copied (``save(snapshot=...)`` overrides it per call).
            ``"eager"`` copies everything before ``save()`` returns. ``"pipelined"`` copies
            before returning only what no guard protects, and the tensors that an optimizer in
            the state updates (its parameters and state) in the background while the next
            forward/backward runs; that optimizer's next ``step()`` waits for them. Anything
            else that changes those tensors in place must call ``wait_snapshot()`` first.
        check_snapshot: debug aid for ``"pipelined"``: checksum every tensor copied in the
            background at ``save()`` and again once copied; a mismatch (the tensor was changed
            in place without a guard) fails the save with ``SnapshotMutatedError``. Costs a
            full extra read of those tensors per save (a synchronous copy for CUDA tensors).
        encryption: encrypt every checkpoint this writer saves (see :class:`Encryption`); the
            index records the mode, never the key. None: files are plain torch.save files.
        series: name of the checkpoint series this writer saves into (None: the default series).
            Several series can share one folder and its index (one writer at a time): each entry
            records its series, and ``keep_last`` / ``keep_every_n_minutes`` / ``keep_period``
            only ever consider entries of the writer's own series. The minute windows of a named
            series are counted from its oldest listed checkpoint.
        extra_types: classes whose instances may appear in the state although they are neither
            tensors nor containers, e.g. ``[MyRecord]`` or ``{MyRecord: reduce_fn}``. Instances
            of exactly these classes are deep-copied (``copy.deepcopy``) when the snapshot is
            taken and pickled into the file as objects: with the class's own pickling, or with
            the given copyreg-style reducer. ``numpy.ndarray`` may be listed to keep arrays as
            numpy arrays instead of storing them as tensors. Tensors inside such objects are
            copied by ``deepcopy``, not through the buffer pool. Reading the file back with
            ``torch.load(weights_only=True)`` (and ``asyncckpt.load``) requires the classes and
            whatever their pickles reference to be allowlisted with
            ``torch.serialization.add_safe_globals``.
        cpu_locations: record every tensor as a CPU tensor in the file, as ``.cpu()`` before
            ``torch.save`` would (what mmengine writes), instead of the device it was copied
            from; ``torch.load`` without ``map_location`` then works on machines without that
            device.
        writer_nice: how much lower than the training loop's the scheduling priority of the
            thread that serializes and writes checkpoints is (``nice`` increment, 0-19; Linux
            only). The default lets the writer use idle CPU without taking cores from torch's
            compute threads; 0 keeps the normal priority.
        distributed: multi-rank checkpoints under ``torch.distributed``. None (default):
            on when it is initialized with more than one rank; False: off (every rank is an
            independent single-process writer, so they need separate folders); True: on
            (an error unless initialized); a ``ProcessGroup``: on, over that group's ranks.
            When on, every rank of the group opens the checkpointer and calls ``save()``
            with the same step in the same order; see the multi-rank guide.
        dist_timeout: seconds a multi-rank save waits for the other ranks once this rank's
            part is durable; past it, every surviving rank gets a ``WriterError``.
    """

    filename: str = "step_{step}.pt"
    queue_size: int = 1
    when_full: WhenFull = "block"
    keep_last: int | None = None
    keep_every_n_minutes: float | None = None
    keep_period: int | None = None
    best: tuple[BestMetric, ...] = field(default=())
    last_checkpoint: bool = True
    on_exception: OnException = "drain"
    max_retries: int = 3
    retry_backoff: float = 0.05
    torch_crc32: bool = False
    snapshot: SnapshotMode = "eager"
    check_snapshot: bool = False
    encryption: Encryption | None = None
    series: str | None = None
    extra_types: ExtraTypes = field(default=())
    cpu_locations: bool = False
    writer_nice: int = 10
    distributed: bool | Any | None = None
    dist_timeout: float = 120.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "best", normalize_best(self.best))
        object.__setattr__(self, "extra_types", normalize_extra_types(self.extra_types))
        FilenameTemplate(self.filename)  # validates
        _positive_int(self.queue_size, "queue_size", allow_none=False)
        _positive_int(self.keep_last, "keep_last")
        _positive_int(self.keep_period, "keep_period")
        if self.keep_every_n_minutes is not None:
            if isinstance(self.keep_every_n_minutes, bool) or not isinstance(
                self.keep_every_n_minutes, (int, float)
            ):
                raise TypeError(
                    "keep_every_n_minutes must be a number, "
                    f"got {type(self.keep_every_n_minutes).__name__}"
                )
            if not (math.isfinite(self.keep_every_n_minutes) and self.keep_every_n_minutes > 0):
                raise ValueError(
                    f"keep_every_n_minutes must be > 0, got {self.keep_every_n_minutes}"
                )
        if (
            self.keep_period is not None
            and self.keep_last is None
            and self.keep_every_n_minutes is None
        ):
            raise ValueError(
                "keep_period only protects checkpoints from a limiting rule; without keep_last "
                "or keep_every_n_minutes nothing is deleted anyway. Pass one of them as well."
            )
        for name, allowed in (
            ("when_full", WhenFull),
            ("on_exception", OnException),
            ("snapshot", SnapshotMode),
        ):
            value = getattr(self, name)
            if value not in get_args(allowed):
                choices = ", ".join(repr(a) for a in get_args(allowed))
                raise ValueError(f"{name} must be one of {choices}, got {value!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int):
            raise TypeError(f"max_retries must be an int, got {type(self.max_retries).__name__}")
        if isinstance(self.writer_nice, bool) or not isinstance(self.writer_nice, int):
            raise TypeError(f"writer_nice must be an int, got {type(self.writer_nice).__name__}")
        if not 0 <= self.writer_nice <= 19:
            raise ValueError(f"writer_nice must be between 0 and 19, got {self.writer_nice}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {self.max_retries}")
        if not isinstance(self.retry_backoff, (int, float)) or not (
            math.isfinite(self.retry_backoff) and self.retry_backoff >= 0
        ):
            raise ValueError(
                f"retry_backoff must be a finite number >= 0, got {self.retry_backoff!r}"
            )
        for name in ("last_checkpoint", "torch_crc32", "cpu_locations", "check_snapshot"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.encryption is not None and not isinstance(self.encryption, Encryption):
            raise TypeError(
                "encryption must be an asyncckpt.Encryption (e.g. Encryption(key, 'AES-GCM')), "
                f"got {type(self.encryption).__name__}"
            )
        if self.series is not None:
            check_series(self.series, "series")
        _check_distributed(self.distributed, self.dist_timeout)

    @classmethod
    def from_options(
        cls, config: CheckpointerConfig | None, options: Mapping[str, object]
    ) -> CheckpointerConfig:
        """Build the config a front door was given: ``config=`` or keyword options, not both.

        Raises:
            TypeError: both were given, or an option is unknown.
        """
        if config is not None:
            if options:
                raise TypeError(
                    "pass either config= or keyword options, not both "
                    f"(got config and {', '.join(sorted(options))})"
                )
            if not isinstance(config, CheckpointerConfig):
                raise TypeError(f"config must be a CheckpointerConfig, got {type(config).__name__}")
            return config
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(
                f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(known))}"
            )
        return cls(**options)  # type: ignore[arg-type]

    @property
    def multi_rank(self) -> bool:
        """Whether saves are collective over several ranks (see ``distributed``)."""
        if self.distributed is False:
            return False
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            if self.distributed is None:
                return False
            raise ValueError(
                "distributed= asks for multi-rank checkpoints, but torch.distributed is not "
                "initialized: call torch.distributed.init_process_group() first"
            )
        if self.distributed is None:
            return dist.get_world_size() > 1
        return True

    @property
    def template(self) -> FilenameTemplate:
        """The parsed filename template."""
        return FilenameTemplate(self.filename)


def _check_distributed(distributed: object, timeout: object) -> None:
    if distributed is not None and not isinstance(distributed, bool):
        import torch.distributed as dist

        if not dist.is_available() or not isinstance(distributed, dist.ProcessGroup):
            raise TypeError(
                "distributed must be None, a bool or a torch.distributed.ProcessGroup, got "
                f"{type(distributed).__name__}"
            )
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
        math.isfinite(timeout) and timeout > 0
    ):
        raise ValueError(f"dist_timeout must be a positive number of seconds, got {timeout!r}")
