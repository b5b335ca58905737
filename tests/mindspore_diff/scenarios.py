"""Scenarios the differential tier runs through real MindSpore and through asyncckpt's adapter.

Plain data only: this module is imported by the pytest side and by ``ms_driver.py``, which runs
in MindSpore's own virtual environment (no torch, no asyncckpt there).

A scenario is a list of training runs in one fresh folder. Each run:

* ``epochs``, ``batch_num``, ``initial_epoch``: what ``Model.train`` is given;
* ``dt``: seconds the fake clock advances before every step (it starts at ``CLOCK_START``);
* ``callbacks``: ``ModelCheckpoint`` arguments, in callback-list order: ``prefix`` and
  ``config`` (``CheckpointConfig`` keyword arguments; ``"saved_network": "net"`` means the
  trained network itself);
* ``raise_at``: ``{"hook": begin | epoch_begin | step_begin | step_end, "epoch": E,
  "step": S}`` (S counts within the epoch) makes a callback raise ``Boom`` there; ``raiser``
  says whether that callback comes ``"first"`` or ``"last"`` in the list;
* ``pre_files``: empty files created in the folder before the run.
"""

from __future__ import annotations

from typing import Any

CLOCK_START = 1_000_000.0
LONG_PREFIX = "p" * 220


def run(callbacks: list[dict[str, Any]], epochs: int = 2, batch_num: int = 5, **extra: Any
        ) -> dict[str, Any]:
    """One training run with defaults filled in."""
    spec: dict[str, Any] = {
        "epochs": epochs, "batch_num": batch_num, "initial_epoch": 0, "dt": 1.0,
        "callbacks": callbacks, "raise_at": None, "raiser": "first", "pre_files": [],
    }
    spec.update(extra)
    return spec


def cb(prefix: str = "CKP", **config: Any) -> dict[str, Any]:
    """One ``ModelCheckpoint``."""
    return {"prefix": prefix, "config": config}


APPEND = ["epoch_num", "step_num", {"epoch_num": 10, "lr": 0.5, "flag": True, "n": 3}]
BREAK = {"exception_save": True, "append_info": ["epoch_num", "step_num"]}

SCENARIOS: dict[str, list[dict[str, Any]]] = {
    "steps_and_keep_max": [run([cb(save_checkpoint_steps=3, keep_checkpoint_max=2)], 3)],
    "keep_max_default": [run([cb(save_checkpoint_steps=1)], 2, 4)],
    "seconds_trigger": [run([cb(save_checkpoint_steps=0, save_checkpoint_seconds=10,
                                keep_checkpoint_max=10)], 3, 5, dt=4.0)],
    "end_forces_the_last_step": [run([cb(save_checkpoint_steps=4, keep_checkpoint_max=10)])],
    "no_trigger_saves_nothing": [run([cb(save_checkpoint_steps=0, save_checkpoint_seconds=0,
                                         keep_checkpoint_max=5)])],
    "prefix_renamed_across_runs": [run([cb(save_checkpoint_steps=5)], 1)] * 3,
    "append_info": [run([cb(save_checkpoint_steps=4, append_info=APPEND)])],
    "resume_with_initial_epoch": [
        run([cb(save_checkpoint_steps=3, keep_checkpoint_max=10,
                append_info=["epoch_num", "step_num"])], 3, 5, initial_epoch=1),
    ],
    "breakpoint_in_epoch_begin": [run([cb(save_checkpoint_steps=2, **BREAK)], 3,
                                      raise_at={"hook": "epoch_begin", "epoch": 2, "step": 0})],
    "breakpoint_in_begin": [run([cb(save_checkpoint_steps=2, **BREAK)], 3,
                                raise_at={"hook": "begin", "epoch": 0, "step": 0})],
    "breakpoint_in_step_begin": [run([cb(save_checkpoint_steps=2, **BREAK)], 3,
                                     raise_at={"hook": "step_begin", "epoch": 2, "step": 3})],
    "breakpoint_in_step_end_after_a_save": [
        run([cb(save_checkpoint_steps=2, **BREAK)], 3, raiser="last",
            raise_at={"hook": "step_end", "epoch": 2, "step": 2}),
    ],
    "breakpoint_after_resume": [
        run([cb(save_checkpoint_steps=2, **BREAK)], 4, initial_epoch=2,
            raise_at={"hook": "epoch_begin", "epoch": 4, "step": 0}),
    ],
    "breakpoint_files_are_not_prefix_collisions": [
        run([cb(save_checkpoint_steps=5, **BREAK)], 2,
            raise_at={"hook": "step_begin", "epoch": 2, "step": 2},
            pre_files=["CKP-1_4_breakpoint.ckpt"]),
    ],
    "breakpoint_keeps_the_original_prefix": [
        run([cb(save_checkpoint_steps=5)], 1),
        run([cb(save_checkpoint_steps=5, **BREAK)], 2,
            raise_at={"hook": "step_begin", "epoch": 2, "step": 2}),
        run([cb(save_checkpoint_steps=5, **BREAK)], 2,
            raise_at={"hook": "step_begin", "epoch": 1, "step": 3}),
    ],
    "breakpoint_holds_the_train_network": [
        run([cb(save_checkpoint_steps=4, saved_network="net", **BREAK)], 2,
            raise_at={"hook": "step_begin", "epoch": 2, "step": 2}),
    ],
    "exception_save_by_the_last_callback_only": [
        run([cb("A", save_checkpoint_steps=3, **BREAK), cb("B", save_checkpoint_steps=5, **BREAK)],
            2, raise_at={"hook": "step_begin", "epoch": 2, "step": 2}),
        run([cb("C", save_checkpoint_steps=3, **BREAK), cb("D", save_checkpoint_steps=5)],
            2, raise_at={"hook": "step_begin", "epoch": 2, "step": 2}),
    ],
    "two_prefixes_in_one_folder": [
        run([cb("step", save_checkpoint_steps=2, keep_checkpoint_max=3),
             cb("epoch", save_checkpoint_steps=5, keep_checkpoint_max=2)], 4),
    ],
    "two_prefixes_then_a_breakpoint": [
        run([cb("step", save_checkpoint_steps=2, keep_checkpoint_max=2),
             cb("epoch", save_checkpoint_steps=5, keep_checkpoint_max=2, **BREAK)], 3,
            raise_at={"hook": "step_begin", "epoch": 3, "step": 4}),
    ],
    "empty_prefix": [run([cb("", save_checkpoint_steps=3)], 2)] * 2,
    "long_prefix": [run([cb(LONG_PREFIX, save_checkpoint_steps=5)], 2)],
    "safetensors_files_are_prefix_collisions": [
        run([cb(save_checkpoint_steps=5)], 1, pre_files=["CKP-1_1.safetensors"]),
    ],
    "other_prefixes_are_left_alone": [
        run([cb(save_checkpoint_steps=1, keep_checkpoint_max=2)], 1,
            pre_files=["CKP-9_9.ckpt", "CKPX-1_1.ckpt", "CKP_a-1_1.ckpt", "CKP-graph.meta"]),
    ],
    "async_save_thread": [run([cb(save_checkpoint_steps=2, keep_checkpoint_max=2,
                                  async_save="thread")], 2)],
    "per_n_minutes_spaced_saves": [
        run([cb(save_checkpoint_steps=1, keep_checkpoint_max=0, keep_checkpoint_per_n_minutes=1)],
            1, 4, dt=61.0),
    ],
}

#: Scenarios whose outcome differs by design; the test pins both sides' results.
DESIGN_DIFFERENCES: dict[str, str] = {
    "per_n_minutes_dense_saves": (
        "keep_checkpoint_per_n_minutes: asyncckpt keeps the first checkpoint of each N-minute "
        "window counted from the prefix's first checkpoint; MindSpore, at each save, deletes "
        "all but the oldest file modified within the last N minutes"
    ),
}
SCENARIOS["per_n_minutes_dense_saves"] = [
    run([cb(save_checkpoint_steps=1, keep_checkpoint_max=0, keep_checkpoint_per_n_minutes=1)],
        1, 6, dt=25.0),
]

#: Construction cases: ``("config", kwargs)`` builds a CheckpointConfig, ``("callback",
#: kwargs)`` a ModelCheckpoint in a fresh folder (``"directory": 123`` is passed as given).
VALIDATION: dict[str, tuple[str, dict[str, Any]]] = {
    "steps_bool": ("config", {"save_checkpoint_steps": True}),
    "steps_str": ("config", {"save_checkpoint_steps": "a"}),
    "steps_negative": ("config", {"save_checkpoint_steps": -1}),
    "seconds_float": ("config", {"save_checkpoint_seconds": 1.5}),
    "keep_max_negative": ("config", {"keep_checkpoint_max": -2}),
    "per_n_str": ("config", {"keep_checkpoint_per_n_minutes": "1"}),
    "all_zero": ("config", {"save_checkpoint_steps": 0, "save_checkpoint_seconds": 0,
                            "keep_checkpoint_max": 0, "keep_checkpoint_per_n_minutes": 0}),
    "all_none": ("config", {"save_checkpoint_steps": None, "save_checkpoint_seconds": None,
                            "keep_checkpoint_max": None, "keep_checkpoint_per_n_minutes": None}),
    "integrated_save_int": ("config", {"integrated_save": 1}),
    "integrated_save_false": ("config", {"integrated_save": False}),
    "async_save_thread": ("config", {"async_save": "thread"}),
    "async_save_process": ("config", {"async_save": "process"}),
    "async_save_bad_str": ("config", {"async_save": "yes"}),
    "async_save_int": ("config", {"async_save": 1}),
    "exception_save_none": ("config", {"exception_save": None}),
    "exception_save_int": ("config", {"exception_save": 1}),
    "saved_network_str": ("config", {"saved_network": "net"}),
    "enc_key_str": ("config", {"enc_key": "0123456789abcdef"}),
    "enc_mode_int": ("config", {"enc_mode": 1}),
    "enc_mode_without_key": ("config", {"enc_mode": "anything"}),
    "crc_check_true": ("config", {"crc_check": True}),
    "crc_check_int": ("config", {"crc_check": 1}),
    "format_ckpt": ("config", {"format": "ckpt"}),
    "format_int": ("config", {"format": 1}),
    "remove_redundancy_int": ("config", {"remove_redundancy": 1}),
    "remove_redundancy_true": ("config", {"remove_redundancy": True}),
    "extra_keyword": ("config", {"incremental": True, "enable_redundance": True}),
    "append_not_list": ("config", {"append_info": "epoch_num"}),
    "append_tuple": ("config", {"append_info": ("epoch_num",)}),
    "append_unknown_str": ("config", {"append_info": ["epoch"]}),
    "append_int_element": ("config", {"append_info": [1]}),
    "append_two_dicts": ("config", {"append_info": [{"a": 1}, {"b": 2}]}),
    "append_list_value": ("config", {"append_info": [{"a": [1]}]}),
    "append_int_key": ("config", {"append_info": [{1: 1}]}),
    "append_str_value": ("config", {"append_info": [{"s": "text"}]}),
    "prefix_int": ("callback", {"prefix": 123}),
    "prefix_slash": ("callback", {"prefix": "a/b"}),
    "prefix_empty": ("callback", {"prefix": ""}),
    "prefix_long": ("callback", {"prefix": LONG_PREFIX}),
    "directory_int": ("callback", {"directory": 123}),
    "config_str": ("callback", {"config": "type_error"}),
}

#: Validation cases that differ by design: name -> (MindSpore's outcome, ours, why).
VALIDATION_DIFFERENCES: dict[str, tuple[str, str, str]] = {
    "enc_key_wrong_length": ("ok", "ValueError",
                             "a key of the wrong length fails when the config is built"),
    "enc_mode_unknown": ("ok", "ValueError", "an unknown mode fails when the config is built"),
    "enc_mode_sm4": ("ok", "ValueError", "SM4 is not available: AES-GCM and AES-CBC only"),
    "format_safetensors": ("ok", "ValueError", "asyncckpt writes torch.save files only"),
    "append_reserved_key": ("ok", "ValueError",
                            "'network' and 'optimizer' are the file's own top-level keys"),
    "prefix_hidden": ("ok", "ValueError",
                      "names starting with '.' are asyncckpt's temporary files"),
}
VALIDATION.update({
    "enc_key_wrong_length": ("config", {"enc_key": b"short"}),
    "enc_mode_unknown": ("config", {"enc_key": bytes(16), "enc_mode": "AES-ECB"}),
    "enc_mode_sm4": ("config", {"enc_key": bytes(16), "enc_mode": "SM4-CBC"}),
    "format_safetensors": ("config", {"format": "safetensors"}),
    "append_reserved_key": ("config", {"append_info": [{"network": 1}]}),
    "prefix_hidden": ("callback", {"prefix": ".hidden"}),
})
