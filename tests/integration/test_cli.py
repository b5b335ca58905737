"""The ``asyncckpt`` command line, run through its real entry point (``main`` or a process)."""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import os
import pickle
import pty
import struct
import subprocess
import sys
import termios
import unicodedata
import warnings
import zipfile

import pytest
import torch
from support.helpers import WrappedStorage

import asyncckpt
from asyncckpt import Checkpointer
from asyncckpt._cli import main
from asyncckpt._cli._output import safe
from asyncckpt._cli_prune import prune
from asyncckpt._format.naming import INDEX_NAME
from asyncckpt.storage import LocalStorage

ACC = (0.1, 0.9, 0.3, 0.4, 0.2)
COMMANDS = ("ls", "verify", "inspect", "publish", "convert", "prune", "demo", "bench")


def state_for(step: int) -> dict:
    return {"state_dict": {"w": torch.full((8, 4), float(step)), "b": torch.zeros(4)},
            "optimizer": {"lr": 0.1, "step": step}, "meta": {"epoch": step // 2}}


@pytest.fixture
def folder(tmp_path):
    path = tmp_path / "run"
    with Checkpointer(path, best={"acc": "greater"}) as ckpt:
        for step, acc in enumerate(ACC, start=1):
            ckpt.save(state_for(step), step=step, epoch=step // 2,
                      metrics={"acc": acc, "loss": 1 - acc})
    return path


def index_of(path) -> dict:
    return json.loads((path / INDEX_NAME).read_text())


def run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def cli(*argv, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "asyncckpt", *map(str, argv)],
                          stdout=subprocess.PIPE, stderr=stderr, text=True, timeout=120,
                          check=False)


# -- help and exit codes ---------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example_and_the_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0
    assert f"example:\n  asyncckpt {command}" in out and "exit codes:" in out


def test_usage_errors_exit_2(folder, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["prune", str(folder), "--keep-last", "0"])
    assert exited.value.code == 2 and "must be >= 1" in capsys.readouterr().err
    code, _, err = run(["ls", folder, "--storage-option", "no_such_option=1"], capsys)
    assert code == 2 and "no_such_option" in err


# -- ls --------------------------------------------------------------------------------------------
def test_ls_lists_every_checkpoint_with_latest_and_best_marks(folder, capsys):
    code, out, _ = run(["ls", folder], capsys)  # not a terminal: tab-separated values
    rows = [line.split("\t") for line in out.splitlines()]
    assert code == 0
    assert [r[0] for r in rows] == [f"step_{s}.pt" for s in range(1, 6)]
    assert [r[1] for r in rows] == ["1", "2", "3", "4", "5"]
    assert [r[2] for r in rows] == ["0", "1", "1", "2", "2"]
    assert [int(r[4]) for r in rows] == [(folder / r[0]).stat().st_size for r in rows]
    assert rows[1][5] == "acc=0.9 loss=0.1"
    assert [r[6] for r in rows] == ["", "best:acc", "", "", "latest"]


def test_ls_table_and_json(folder, capsys):
    code, out, _ = run(["ls", folder, "--format", "table"], capsys)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["NAME", "STEP", "EPOCH", "TIME", "SIZE",
                                              "METRICS", "MARKS"]
    assert "KiB" in lines[1] and lines[2].endswith("best:acc") and lines[5].endswith("latest")
    code, out, _ = run(["ls", folder, "--json"], capsys)
    doc = json.loads(out)
    assert code == 0 and doc["latest"] == "step_5.pt"
    assert doc["best"]["acc"] == {"name": "step_2.pt", "step": 2, "mode": "greater", "value": 0.9}
    listed = asyncckpt.checkpoints(folder)
    assert [c["name"] for c in doc["checkpoints"]] == [c.name for c in listed]
    assert [c["checksum"] for c in doc["checkpoints"]] == [c.checksum for c in listed]
    assert [c["best"] for c in doc["checkpoints"]][1] == ["acc"]


def test_ls_reaches_a_custom_s3_endpoint_through_storage_options(
    s3_uri, s3_options, moto_endpoint, capsys
):
    with Checkpointer(s3_uri, storage_options=s3_options) as ckpt:
        ckpt.save(state_for(7), step=7)
    code, out, err = run(["ls", s3_uri, "--storage-option", f"endpoint_url={moto_endpoint}"],
                         capsys)
    assert code == 0, err
    assert out.split("\t")[0] == "step_7.pt" and out.rstrip().endswith("latest")
    code, out, _ = run(["inspect", f"{s3_uri}/step_7.pt", "--storage-option",
                        f"endpoint_url={moto_endpoint}"], capsys)
    assert code == 0 and "state_dict.w" in out


# -- escaping --------------------------------------------------------------------------------------
HOSTILE_NAME = "step_\u202egnp.pt"  # a right-to-left override: displays as "step_tp.png"
HOSTILE_KEY = "acc\x1b]0;owned\x07\x1b[2J\u009b1m"  # retitle, clear screen, 8-bit CSI


def _dangerous(text: str) -> list[str]:
    return [c for c in text if c not in "\n\t"
            and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")]


def test_printed_names_and_keys_are_escaped(folder, capsys):
    # A folder written by someone else: its index may name anything a file system allows.
    os.rename(folder / "step_5.pt", folder / HOSTILE_NAME)
    doc = index_of(folder)
    doc["entries"][-1]["name"] = doc["latest"] = HOSTILE_NAME
    doc["entries"][-1]["metrics"][HOSTILE_KEY] = 1.0
    (folder / INDEX_NAME).write_text(json.dumps(doc))
    outputs = []
    for argv in (["ls", folder], ["ls", folder, "--format", "table"], ["verify", folder],
                 ["prune", folder, "--keep-last", "1", "--dry-run"],
                 ["inspect", folder / HOSTILE_NAME], ["verify", folder / "missing\u202e"]):
        code, out, err = run(argv, capsys)
        assert not _dangerous(out + err), argv
        outputs.append(out + err)
    # The index reader refuses such a name; the refusal names it, escaped.
    assert "step_\\u202egnp.pt" in outputs[0] and "step_\\u202egnp.pt" in outputs[2]
    code, out, err = run(["ls", folder, "--json"], capsys)
    assert code != 0 and not _dangerous(out + err)


def test_safe_escapes_exactly_the_dangerous_characters():
    assert safe("plain naïve 名前.pt") == "plain naïve 名前.pt"
    assert safe("a\\u202e") == "a\\\\u202e"  # a name spelling an escape cannot pass for one
    assert safe("\x00\x1b\x7f\u0085\u200b\u2028\u2066\ufeff\ud800") == (
        "\\x00\\x1b\\x7f\\x85\\u200b\\u2028\\u2066\\ufeff\\ud800")


# -- verify ----------------------------------------------------------------------------------------
def _stderr_through_a_terminal(*argv) -> tuple[int, str]:
    leader, follower = pty.openpty()
    # a terminal of 24 x 100 characters (a fresh pseudo-terminal has no size)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "asyncckpt", *map(str, argv)],
                            stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: every writer of the terminal has closed it
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    return proc.wait(timeout=120), b"".join(chunks).decode("utf-8", "replace")


def test_verify_draws_a_progress_bar_only_on_a_terminal(folder):
    code, terminal = _stderr_through_a_terminal("verify", folder)
    assert code == 0 and "verifying" in terminal and "%" in terminal
    piped = cli("verify", folder)
    assert piped.returncode == 0 and piped.stderr == ""
    assert "5 checkpoint(s) checked, OK" in piped.stdout


def test_verify_exit_codes(folder, tmp_path, capsys):
    assert run(["verify", folder], capsys)[0] == 0
    (folder / "step_3.pt").write_bytes(b"garbage")
    code, out, _ = run(["verify", folder], capsys)
    assert code == 1 and "SIZE    step_3.pt" in out
    code, _, err = run(["verify", tmp_path / "nothing"], capsys)
    assert code == 2 and INDEX_NAME in err


# -- inspect ---------------------------------------------------------------------------------------
def rich_state() -> dict:
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    model = torch.nn.Linear(6, 3)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(2, 6)).sum().backward()
    opt.step()
    return {
        "model": model.state_dict(), "optimizer": opt.state_dict(),
        "tied": {"embed": base, "head": base},  # one storage, two names
        "views": {"t": base.t(), "row": base[2], "scalar": torch.tensor(3, dtype=torch.int64)},
        "kinds": [torch.zeros(2, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bool),
                  torch.empty(0, 5), torch.nn.Parameter(torch.ones(2))],
        "plain": {"step": 7, "name": "run", "none": None, 3: 1.5},
    }


def _tensors(tree, path=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _tensors(v, (f"{path}.{k}" if path else k) if isinstance(k, str)
                                else f"{path}[{k!r}]")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from _tensors(v, f"{path}[{i}]")
    elif isinstance(tree, torch.Tensor):
        yield path, tree


def test_inspect_agrees_with_torch_load(tmp_path, capsys):
    path = tmp_path / "rich.pt"
    torch.save(rich_state(), path)
    code, out, _ = run(["inspect", path, "--json"], capsys)
    doc = json.loads(out)
    entries = {e["path"]: e for e in doc["entries"]}
    loaded = dict(_tensors(torch.load(path, weights_only=True)))
    assert code == 0 and doc["tensors"] == len(loaded)
    for name, t in loaded.items():
        e = entries[name]
        assert (e["dtype"], e["shape"], e["nbytes"], e["offset"], e["contiguous"]) == (
            str(t.dtype).removeprefix("torch."), list(t.shape), t.nbytes, t.storage_offset(),
            t.is_contiguous()), name
    assert entries["tied.head"]["shares_with"] == "tied.embed"
    assert entries["views.row"]["offset"] == 12 and entries["kinds[3]"]["type"] == "parameter"
    assert entries["plain.step"]["value"] == "7" and entries["plain[3]"]["value"] == "1.5"
    assert doc["total_bytes"] == sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                                      for t in loaded.values()}.values())


def test_inspect_reads_no_tensor_data(folder, tmp_path, capsys):
    # The same archive without its storage records: torch.load fails, inspect does not notice.
    stripped = tmp_path / "structure_only.pt"
    with zipfile.ZipFile(folder / "step_2.pt") as src, zipfile.ZipFile(stripped, "w") as dst:
        for info in src.infolist():
            if "/data/" not in info.filename:
                dst.writestr(info.filename, src.open(info).read() if info.CRC else
                             _raw(folder / "step_2.pt", info))
    with pytest.raises(Exception, match="data/0"):
        torch.load(stripped, weights_only=True)
    assert run(["inspect", stripped], capsys)[1].replace(str(stripped), "X") == \
        run(["inspect", folder / "step_2.pt"], capsys)[1].replace(str(folder / "step_2.pt"), "X")


def _raw(path, info: zipfile.ZipInfo) -> bytes:
    """A stored record's bytes (asyncckpt may write records without a CRC)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset + 26)
        n, m = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
        f.seek(info.header_offset + 30 + n + m)
        return f.read(info.compress_size)


class Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_inspect_refuses_what_weights_only_loading_refuses(tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "x": Payload(str(marker))}, evil)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(evil, weights_only=True)
    code, out, err = run(["inspect", evil], capsys)
    assert code == 1 and out == "" and "refused" in err and "io.open" in err
    assert not marker.exists()


def test_inspect_explains_files_it_cannot_read(tmp_path, capsys):
    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    code, _, err = run(["inspect", legacy], capsys)
    assert code == 1 and "not a zip-format torch.save file" in err
    script = tmp_path / "script.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated; its files still exist
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), script)
    code, _, err = run(["inspect", script], capsys)
    assert code == 1 and "TorchScript" in err
    code, _, err = run(["inspect", tmp_path / "absent.pt"], capsys)
    assert code == 2 and "absent.pt" in err


# -- publish ---------------------------------------------------------------------------------------
def test_publish_keeps_the_published_keys_and_names_the_file_by_its_hash(
    folder, tmp_path, capsys
):
    from mmengine.hooks import CheckpointHook

    code, out, err = run(["publish", folder / "step_2.pt", "--out-dir", tmp_path / "out"], capsys)
    (ours,) = (tmp_path / "out").iterdir()
    assert code == 0 and f"to {ours}" in out and "'optimizer'" in err
    assert ours.name == f"step_2-{hashlib.sha256(ours.read_bytes()).hexdigest()[:8]}.pth"
    # torch.hub checks a download against the hash in its name
    fetched = torch.hub.load_state_dict_from_url(
        ours.as_uri(), model_dir=str(tmp_path / "hub"), check_hash=True, weights_only=True)
    # the same keys as mmengine's own hook keeps from the same checkpoint
    (tmp_path / "mm").mkdir()
    torch.save(state_for(2), tmp_path / "mm" / "step_2.pt")
    CheckpointHook(published_keys=["meta", "state_dict"])._publish_model(
        None, str(tmp_path / "mm" / "step_2.pt"))
    (theirs,) = (tmp_path / "mm").glob("step_2-*.pth")
    reference = torch.load(theirs, weights_only=True)
    assert fetched.keys() == reference.keys() == {"meta", "state_dict"}
    assert fetched["meta"] == reference["meta"]
    assert all(torch.equal(fetched["state_dict"][k], v)
               for k, v in reference["state_dict"].items())


def test_publish_refusals(folder, tmp_path, capsys):
    code, _, err = run(["publish", folder / "step_1.pt", "--keys", "meta", "meta"], capsys)
    assert code == 2 and "twice" in err
    torch.save([torch.ones(1)], tmp_path / "list.pt")
    with pytest.warns(asyncckpt.UnverifiedCheckpointWarning):  # a file no index lists
        code, _, err = run(["publish", tmp_path / "list.pt"], capsys)
    assert code == 1 and "not a dict" in err


# -- convert ---------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::asyncckpt.UnverifiedCheckpointWarning")  # a loose file
def test_convert_writes_every_tensor_under_its_dotted_name(tmp_path, capsys):
    load_file = pytest.importorskip("safetensors.torch").load_file
    path = tmp_path / "state.pt"
    base = torch.arange(12.0).reshape(3, 4)
    torch.save({"model": {"w": base, "tied": base, "t": base.t()}, "hist": [torch.ones(2)],
                "step": 3}, path)
    code, _, err = run(["convert", path, "--to", "safetensors"], capsys)
    assert code == 1 and "step" in err and "--skip-non-tensors" in err
    code, out, err = run(["convert", path, "--to", "safetensors", "--skip-non-tensors"], capsys)
    assert code == 0 and "left out 1 non-tensor value(s): step" in err
    assert "2 tensor(s) that shared memory or were not contiguous" in err
    tensors = load_file(tmp_path / "state.safetensors")
    assert sorted(tensors) == ["hist.0", "model.t", "model.tied", "model.w"]
    assert torch.equal(tensors["model.t"], base.t()) and torch.equal(tensors["model.tied"], base)


def test_convert_without_safetensors_says_what_to_install(folder):
    code = ("import sys; sys.modules['safetensors'] = None; from asyncckpt._cli import main; "
            f"raise SystemExit(main(['convert', {str(folder / 'step_1.pt')!r}, "
            "'--to', 'safetensors']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 1 and "pip install 'asyncckpt[safetensors]'" in result.stderr
    assert not (folder / "step_1.safetensors").exists()


# -- prune -----------------------------------------------------------------------------------------
def test_prune_keeps_the_newest_the_best_and_the_kept(tmp_path, capsys):
    path = tmp_path / "run"
    with Checkpointer(path, best={"acc": "greater"}) as ckpt:
        for step, acc in enumerate(ACC, start=1):
            ckpt.save(state_for(step), step=step, metrics={"acc": acc}, keep=step == 1)
    code, out, _ = run(["prune", path, "--keep-last", "2", "--dry-run"], capsys)
    assert code == 0 and "would remove step_3.pt" in out and len(index_of(path)["entries"]) == 5
    code, out, _ = run(["prune", path, "--keep-last", "2"], capsys)
    assert code == 0 and out.splitlines()[0] == "removed step_3.pt"
    assert [e.name for e in asyncckpt.checkpoints(path)] == [
        "step_1.pt", "step_2.pt", "step_4.pt", "step_5.pt"]
    assert not (path / "step_3.pt").exists() and index_of(path)["rotation"]["pending_deletes"] == []
    assert asyncckpt.verify(path).ok and asyncckpt.load(path, "best:acc")["optimizer"]["step"] == 2
    assert prune(path, 2) == []  # nothing over the limit any more


def test_prune_is_refused_while_a_writer_holds_the_folder(folder, capsys):
    before = (folder / INDEX_NAME).read_bytes()
    with Checkpointer(folder, best={"acc": "greater"}):
        code, _, err = run(["prune", folder, "--keep-last", "1"], capsys)
    assert code == 1 and "another writer" in err
    assert (folder / INDEX_NAME).read_bytes() == before and (folder / "step_1.pt").exists()


def test_prune_of_something_else_exits_2_and_creates_nothing(tmp_path, capsys):
    code, _, err = run(["prune", tmp_path / "nothing", "--keep-last", "1"], capsys)
    assert code == 2 and INDEX_NAME in err and not (tmp_path / "nothing").exists()


def test_prune_publishes_nothing_and_deletes_nothing_when_the_index_write_fails(folder):
    storage = WrappedStorage(LocalStorage(folder))
    storage.fail_write = lambda name, attempt: OSError("disk full") if name == INDEX_NAME else None
    before = (folder / INDEX_NAME).read_bytes()
    with pytest.raises(OSError, match="disk full"):
        prune(storage, 1)
    assert (folder / INDEX_NAME).read_bytes() == before
    assert all((folder / f"step_{s}.pt").exists() for s in range(1, 6))


KILL_ON_DELETE = """
import os, signal, sys
from support.helpers import WrappedStorage
from asyncckpt._cli_prune import prune
from asyncckpt.storage import LocalStorage
storage = WrappedStorage(LocalStorage(sys.argv[1]))
storage.fail_delete = lambda name: os.kill(os.getpid(), signal.SIGKILL)
prune(storage, 1)
"""


def test_prune_killed_between_index_and_deletes_leaves_a_consistent_folder(folder, capsys):
    tests = os.path.dirname(os.path.dirname(__file__))
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", KILL_ON_DELETE, str(folder)], env=env,
                            capture_output=True, timeout=120, check=False)
    assert killed.returncode == -9, killed.stderr
    doc = index_of(folder)
    assert [e["name"] for e in doc["entries"]] == ["step_2.pt", "step_5.pt"]  # best, latest
    assert doc["rotation"]["pending_deletes"] == ["step_1.pt", "step_3.pt", "step_4.pt"]
    assert (folder / "step_1.pt").exists() and asyncckpt.verify(folder).ok
    code, out, _ = run(["prune", folder, "--keep-last", "1"], capsys)  # finishes the deletes
    assert code == 0 and "0 checkpoint(s) removed" in out
    assert not any((folder / f"step_{s}.pt").exists() for s in (1, 3, 4))
    assert index_of(folder)["rotation"]["pending_deletes"] == []


def test_prune_on_s3(s3_uri, s3_options, capsys):
    with Checkpointer(s3_uri, storage_options=s3_options) as ckpt:
        for step in range(4):
            ckpt.save(state_for(step), step=step)
    assert prune(s3_uri, 1, storage_options=s3_options) == ["step_0.pt", "step_1.pt", "step_2.pt"]
    assert [c.name for c in asyncckpt.checkpoints(s3_uri, storage_options=s3_options)] == [
        "step_3.pt"]
    assert asyncckpt.verify(s3_uri, storage_options=s3_options).ok


def test_top_level_help_names_every_command(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    out = capsys.readouterr().out
    assert exited.value.code == 0 and "exit codes:" in out
    assert all(f"    {command} " in out for command in COMMANDS)


def test_ls_output_is_plain_text_for_pipes(folder):
    result = cli("ls", folder)
    assert result.returncode == 0 and result.stdout.splitlines()[-1].startswith("step_5.pt\t")
    assert io.StringIO(result.stdout).readline().count("\t") == 6
