"""The per-store seam of multi-rank saves (``_dist/targets.py``) without torch.distributed: what
counts as a checkpoint file, conflicting saver options, a local layout's leftovers."""

from __future__ import annotations

import anyio
import pytest

from asyncckpt._dist import DistSaver
from asyncckpt._dist.targets import LocalLayout, is_checkpoint_file


@pytest.mark.parametrize("name", ["__0_0.distcp", "__17_0.distcp", ".metadata",
                                  ".asyncckpt.json"])
def test_files_a_multi_rank_save_writes_are_recognised(name):
    assert is_checkpoint_file(name)


@pytest.mark.parametrize("name", ["readme.txt", "__0_0.distcp.bak", "x/__0_0.distcp",
                                  "metadata", "__a_0.distcp"])
def test_other_files_are_not_taken_for_checkpoint_files(name):
    assert not is_checkpoint_file(name)


def test_open_file_with_a_layout_is_refused(tmp_path):
    with pytest.raises(ValueError, match="open_file cannot be combined with the layout"):
        DistSaver(LocalLayout(tmp_path), group=None, open_file=open)  # type: ignore[arg-type]


def test_a_local_layout_removes_temporaries_and_unlisted_checkpoints(tmp_path):
    (tmp_path / ".asyncckpt-tmp.step_3.abc.2").mkdir()
    for name in ("step_1", "step_2"):
        (tmp_path / name).mkdir()
        (tmp_path / name / ".asyncckpt.json").write_text("{}")
    (tmp_path / "notes").mkdir()  # not a checkpoint: left alone
    removed = anyio.run(LocalLayout(tmp_path).remove_leftovers, {"step_1"})
    assert sorted(removed) == [".asyncckpt-tmp.step_3.abc.2", "step_2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "step_1"]
