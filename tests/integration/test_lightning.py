"""AsyncCkptIO with the real Lightning Trainer on CPU, side by side with Lightning's own IO.

Each differential test trains the same small module twice with the same seed and the same
``ModelCheckpoint``: once with Lightning's default ``TorchCheckpointIO``, once with
``AsyncCkptIO``. The folders must hold the same checkpoint files with the same contents, the
callback must end in the same state, and resuming from either must give the same weights.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from datetime import timedelta
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from support.helpers import folder_files, tensors_equal

import asyncckpt

pl = pytest.importorskip("lightning.pytorch")

from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from asyncckpt.adapters.lightning import AsyncCkptIO  # noqa: E402

pytestmark = [
    # Lightning's own advice about dataloader workers, and its use of a torch pytree API that
    # torch deprecates: third-party code, nothing asyncckpt does
    pytest.mark.filterwarnings("ignore::lightning.fabric.utilities.warnings.PossibleUserWarning"),
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*is deprecated"),
    pytest.mark.filterwarnings("ignore:The dirpath has changed"),
    pytest.mark.filterwarnings("ignore:Checkpoint directory .* exists and is not empty"),
]


class Boring(pl.LightningModule):
    """A linear layer trained on fixed random data; logs ``train_loss`` and ``val_loss``."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(32, 2)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        # a score that goes up and down, so top-k keeps replacing and deleting
        self.log("val_loss", (self.layer(batch[0]).sum() * 7.3).sin())

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)
        return [opt], [torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)]


def _data() -> DataLoader:
    gen = torch.Generator().manual_seed(1234)
    return DataLoader(TensorDataset(torch.randn(64, 32, generator=gen)), batch_size=8)


def _fit(root: Path, callback: ModelCheckpoint, plugin: AsyncCkptIO | None, *,
         max_epochs: int = 3, ckpt_path: str | None = None, val: bool = True,
         extra: tuple[Callback, ...] = ()) -> pl.Trainer:
    pl.seed_everything(7, verbose=False)
    trainer = pl.Trainer(
        max_epochs=max_epochs, default_root_dir=root, logger=False, accelerator="cpu",
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[callback, *extra], plugins=[] if plugin is None else [plugin],
    )
    trainer.fit(Boring(), _data(), _data() if val else None, ckpt_path=ckpt_path)
    return trainer


def _normalized(obj: object, root: str) -> object:
    """``obj`` with the run's folder replaced by a placeholder in every string."""
    if isinstance(obj, str):
        return obj.replace(root, "<root>")
    if isinstance(obj, dict):
        return {_normalized(k, root): _normalized(v, root) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_normalized(v, root) for v in obj)
    return obj


def _listing(folder: Path) -> dict[str, str | None]:
    """Checkpoint files -> link target (None for regular files)."""
    return {n: os.readlink(folder / n) if (folder / n).is_symlink() else None
            for n in folder_files(folder)}


def _assert_same_run(ref_root: Path, ours_root: Path, ref: ModelCheckpoint,
                     ours: ModelCheckpoint) -> None:
    ref_dir, our_dir = Path(ref.dirpath), Path(ours.dirpath)
    assert _listing(our_dir) == _listing(ref_dir)
    # the index lists exactly the regular checkpoint files: none is missing, none is extra
    regular = {n for n, target in _listing(our_dir).items() if target is None}
    assert {c.name for c in asyncckpt.checkpoints(our_dir)} == regular
    assert asyncckpt.verify(our_dir).ok
    for name in _listing(ref_dir):
        a = torch.load(ref_dir / name, weights_only=True)
        b = torch.load(our_dir / name, weights_only=True)  # plain torch.load, as users do
        assert tensors_equal(_normalized(a, str(ref_root)), _normalized(b, str(ours_root))), name
    assert _normalized(ref.state_dict(), str(ref_root)) == _normalized(
        ours.state_dict(), str(ours_root))


CONFIGS = {
    "top2-min-steps-last": dict(monitor="val_loss", mode="min", save_top_k=2, save_last=True,
                                every_n_train_steps=3),
    "top1-max-epochs-link": dict(monitor="val_loss", mode="max", save_top_k=1,
                                 save_last="link", every_n_epochs=1),
    "all-every-2-epochs": dict(save_top_k=-1, every_n_epochs=2, save_last=True,
                               filename="{epoch}"),
    "time-interval-top2": dict(monitor="train_loss", save_top_k=2,
                               train_time_interval=timedelta(microseconds=1)),
    "fixed-name-rewritten": dict(monitor="val_loss", save_top_k=1, filename="best",
                                 enable_version_counter=False, save_last=True),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_same_folder_and_state_as_lightnings_own_io(tmp_path, config):
    ref_cb, our_cb = ModelCheckpoint(**config), ModelCheckpoint(**config)
    plugin = AsyncCkptIO()
    _fit(tmp_path / "ref", ref_cb, None)
    trainer = _fit(tmp_path / "ours", our_cb, plugin)
    assert plugin.folders == []  # fit's end closed the writer: everything is durable
    _assert_same_run(tmp_path / "ref", tmp_path / "ours", ref_cb, our_cb)
    # what Lightning reports is there
    for path in (our_cb.best_model_path, our_cb.last_model_path, *our_cb.best_k_models):
        assert not path or os.path.exists(path), path
    assert trainer.checkpoint_callback is our_cb


@pytest.mark.parametrize("which", ["last", "best"])
def test_resume_matches_lightnings_own_io(tmp_path, which):
    config = dict(monitor="val_loss", save_top_k=2, save_last=True, every_n_epochs=1)
    finals = []
    for run, plugin in (("ref", None), ("ours", AsyncCkptIO())):
        cb = ModelCheckpoint(**config)
        trainer = _fit(tmp_path / run, cb, plugin)
        if which == "last":  # a new Trainer, as after a crash
            cb = ModelCheckpoint(**config)
            trainer = _fit(tmp_path / run, cb, None if plugin is None else AsyncCkptIO(),
                           max_epochs=5, ckpt_path="last")
            assert Path(trainer.ckpt_path).name == "last.ckpt"
        else:  # "best" is the best of this Trainer's previous fit
            best = cb.best_model_path
            trainer.fit_loop.max_epochs = 5
            trainer.fit(trainer.lightning_module, _data(), _data(), ckpt_path="best")
            assert trainer.ckpt_path == best
        finals.append((trainer, cb))
    (ref, ref_cb), (ours, our_cb) = finals
    assert ours.global_step == ref.global_step
    assert tensors_equal(ours.lightning_module.state_dict(), ref.lightning_module.state_dict())
    _assert_same_run(tmp_path / "ref", tmp_path / "ours", ref_cb, our_cb)


def test_save_checkpoint_after_fit_is_durable_on_return(tmp_path):
    plugin = AsyncCkptIO()
    trainer = _fit(tmp_path, ModelCheckpoint(save_top_k=0), plugin, max_epochs=1)
    target = tmp_path / "export" / "final.ckpt"
    trainer.save_checkpoint(target)
    # no flush, no teardown: the file is listed and complete when save_checkpoint returns
    assert [c.name for c in asyncckpt.checkpoints(target.parent)] == ["final.ckpt"]
    state = torch.load(target, weights_only=True)
    assert state["global_step"] == trainer.global_step
    assert tensors_equal(state["state_dict"], trainer.lightning_module.state_dict())
    plugin.teardown()


class _Probe(Callback):
    """Records whether the plugin sees a running Trainer from inside a hook."""

    def on_train_epoch_end(self, trainer, pl_module):
        from asyncckpt.adapters._lightning_folder import running_trainer_on_stack

        self.inside = running_trainer_on_stack()


def test_a_running_trainer_is_seen_from_its_hooks_only(tmp_path):
    from asyncckpt.adapters._lightning_folder import running_trainer_on_stack

    probe = _Probe()
    _fit(tmp_path, ModelCheckpoint(save_top_k=0), AsyncCkptIO(), max_epochs=1, extra=(probe,))
    assert probe.inside is True
    assert running_trainer_on_stack() is False


class _Extras(Callback):
    """Puts what torch.save pickles but weights_only refuses into every checkpoint."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        import numpy as np

        checkpoint["extras"] = {"ratio": Fraction(1, 3), "hist": np.arange(4, dtype=np.int16)}


def test_objects_beyond_weights_only_are_saved_as_they_are(tmp_path):
    """As with Lightning's IO, the file then needs weights_only=False to load."""
    import numpy as np

    files = []
    for run, plugin in (("ref", None), ("ours", AsyncCkptIO())):
        cb = ModelCheckpoint(save_top_k=1)
        _fit(tmp_path / run, cb, plugin, max_epochs=1, extra=(_Extras(),))
        files.append(cb.best_model_path)
    ref, ours = (torch.load(f, weights_only=False)["extras"] for f in files)
    assert ours["ratio"] == ref["ratio"] == Fraction(1, 3)
    assert isinstance(ours["hist"], np.ndarray) and ours["hist"].dtype == np.int16
    assert ours["hist"].tolist() == ref["hist"].tolist()
    with pytest.raises(Exception, match="Unsupported global"):
        torch.load(files[1], weights_only=True)


def test_options_that_belong_to_model_checkpoint_are_refused(tmp_path):
    with pytest.raises(TypeError, match="keep_last.*ModelCheckpoint"):
        AsyncCkptIO(keep_last=3)
    with pytest.raises(ValueError, match="queue_size must be >= 1"):
        AsyncCkptIO(queue_size=0)
    plugin = AsyncCkptIO()
    with pytest.raises(TypeError, match="storage_options= to AsyncCkptIO"):
        plugin.save_checkpoint({"global_step": 1}, tmp_path / "x.ckpt", storage_options={})
    with pytest.raises(FileNotFoundError, match="not found"):
        plugin.load_checkpoint(tmp_path / "missing.ckpt")


def test_remove_outside_an_asyncckpt_folder_deletes_like_lightning(tmp_path):
    stray = tmp_path / "plain" / "old.ckpt"
    stray.parent.mkdir()
    torch.save({"x": 1}, stray)
    plugin = AsyncCkptIO()
    plugin.remove_checkpoint(stray)
    assert not stray.exists() and plugin.folders == []
    assert os.listdir(stray.parent) == []  # no index was created there


def test_queued_saves_removals_and_loads_outside_a_trainer(tmp_path):
    plugin = AsyncCkptIO(wait_outside_trainer=False)

    def ckpt(step: int) -> dict:
        return {"global_step": step, "epoch": 0, "state_dict": {"w": torch.full((64,), step)}}

    plugin.save_checkpoint(ckpt(3), tmp_path / "a.ckpt")
    assert plugin.load_checkpoint(tmp_path / "a.ckpt")["global_step"] == 3  # waits for it
    plugin.save_checkpoint(ckpt(4), tmp_path / "a.ckpt")  # rewritten at another step
    plugin.save_checkpoint(ckpt(5), tmp_path / "b.ckpt")
    plugin.remove_checkpoint(tmp_path / "a.ckpt")  # now, or with the next save
    plugin.save_checkpoint(ckpt(6), tmp_path / "c.ckpt")
    plugin.remove_checkpoint(tmp_path / "c.ckpt")
    plugin.save_checkpoint(ckpt(7), tmp_path / "c.ckpt")  # saved again: no longer removed
    plugin.teardown()
    assert folder_files(tmp_path) == {"b.ckpt", "c.ckpt"}
    assert [(c.name, c.step) for c in asyncckpt.checkpoints(tmp_path)] == [
        ("b.ckpt", 5), ("c.ckpt", 7)]
    assert plugin.load_checkpoint(tmp_path / "c.ckpt")["global_step"] == 7


def test_bench_measures_the_plugin_beside_lightnings_own_async_io(tmp_path):
    from asyncckpt._bench._contenders import build_contenders, contender_ids
    from asyncckpt._bench._dest import Destination

    ids = contender_ids(("eager",), False)
    assert ids.index("lightning-asyncckpt") == ids.index("lightning") + 1
    dest = Destination(str(tmp_path / "dest"))
    (contender,), skipped = build_contenders(
        dest, modes=("eager",), direct_io=False, queue_size=1, when_full="block",
        select=("lightning-asyncckpt",))
    assert skipped == {}
    contender.open()
    tree = {"w": torch.randn(256, 1024)}
    folder = tmp_path / "dest" / "lightning-asyncckpt"
    for step in (1, 2):
        expected = tree["w"].clone()
        pending = contender.save(tree, step)
        tree["w"].add_(1)  # once save() returned, the saved values are safe from changes
        assert pending.wait() > expected.nbytes
        saved = torch.load(folder / f"lightning-asyncckpt-{step}.ckpt", weights_only=True)
        assert torch.equal(saved["w"], expected)
        contender.cleanup()  # through the plugin: the index lets the file go
        assert asyncckpt.checkpoints(folder) == [] and folder_files(folder) == set()
    contender.close()
    assert not (tmp_path / "dest" / "lightning-asyncckpt").exists()  # its folder is removed


# -- kill mid-fit and resume ------------------------------------------------------------------
class _Gate(Callback):
    """In the child: at the start of epoch ``at``, say so and wait to be killed."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.at:
            print("ready", flush=True)
            sys.stdin.readline()  # the parent never answers; it kills this process


class _StartEpoch(Callback):
    def on_train_start(self, trainer, pl_module):
        self.epoch = trainer.current_epoch


KILL_CONFIG = dict(save_top_k=-1, save_last=True, every_n_epochs=1)


def _child(root: str) -> None:
    _fit(Path(root), ModelCheckpoint(**KILL_CONFIG), AsyncCkptIO(), max_epochs=50, val=False,
         extra=(_Gate(at=4),))


@pytest.mark.filterwarnings("ignore::asyncckpt.UnverifiedCheckpointWarning")  # see below
def test_sigkill_mid_fit_then_resume_from_last(tmp_path):
    root = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[2]), str(Path(__file__).parents[1]),
         os.environ.get("PYTHONPATH", "")])}
    with subprocess.Popen(
        [sys.executable, __file__, str(root)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL, text=True, env=env,
    ) as child:
        try:
            line = ""
            while line.strip() != "ready":
                line = child.stdout.readline()
                assert line, "the child exited before reaching the gate"
            child.send_signal(signal.SIGKILL)  # while its writer may still be writing
        finally:
            child.kill()
            child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    folder = root / "checkpoints"
    assert asyncckpt.verify(folder).ok  # everything listed is there and intact
    # last.ckpt is listed, or -- killed while it was being rewritten -- unlisted but complete
    # (the old bytes or the new: a rename replaced it); either way there is one to resume from
    assert (folder / "last.ckpt").is_file()

    start = _StartEpoch()
    resumed = _fit(root, ModelCheckpoint(**KILL_CONFIG), AsyncCkptIO(), max_epochs=6,
                   val=False, ckpt_path="last", extra=(start,))
    assert start.epoch >= 1  # it resumed from a checkpoint, not from scratch
    reference = _fit(tmp_path / "ref", ModelCheckpoint(**KILL_CONFIG), None, max_epochs=6,
                     val=False)
    assert resumed.global_step == reference.global_step
    assert tensors_equal(resumed.lightning_module.state_dict(),
                         reference.lightning_module.state_dict())
    assert asyncckpt.verify(folder).ok


if __name__ == "__main__":
    _child(sys.argv[1])
