"""Adapters: asyncckpt behind the checkpoint APIs of training frameworks.

Each adapter lives in its own module and imports its framework only when that module is imported,
so ``import asyncckpt`` never pulls in a framework:

* :mod:`asyncckpt.adapters.mmengine` — ``AsyncCheckpointHook``, a drop-in replacement for
  mmengine's ``CheckpointHook`` (needs the ``mmengine`` extra).
* :mod:`asyncckpt.adapters.mmcv` — ``MMCVCheckpointer``: mmcv ``IterBasedRunner``-style
  ``save_checkpoint()`` / ``resume()`` for hand-written loops (needs nothing beyond asyncckpt).
* :mod:`asyncckpt.adapters.mindspore` — MindSpore's ``ModelCheckpoint`` + ``CheckpointConfig``
  callbacks, ``Callback`` / ``RunContext`` and a small ``Model.train`` loop for PyTorch.
"""
