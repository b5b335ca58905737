"""Configuration, templates and rule inference: bad input fails up front with a clear message."""

from __future__ import annotations

import pytest

from asyncckpt import AsyncCheckpointer, BestMetric, Checkpointer, CheckpointerConfig, infer_mode
from asyncckpt._format.best import normalize_best
from asyncckpt._format.naming import FilenameTemplate


@pytest.mark.parametrize(
    ("name", "mode"),
    [
        ("acc", "greater"),
        ("ACC", "greater"),  # case-insensitive
        ("top1", "greater"),
        ("AR@100", "greater"),
        ("mAP", "greater"),
        ("bbox_mAP", "greater"),  # substring
        ("mIoU", "greater"),
        ("aAcc", "greater"),
        ("precision", "greater"),
        ("loss", "less"),
        ("val_loss", "less"),
        ("Loss", "less"),
    ],
)
def test_rule_inference(name, mode):
    assert infer_mode(name) == mode


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("heatmap_loss", "both 'map'"),  # mmengine would silently say greater (via 'map')
        ("accuracy_loss", "both"),
        ("f1", "none of the known"),
        ("psnr", "none of the known"),
    ],
)
def test_ambiguous_or_unknown_rules_are_errors(name, reason):
    with pytest.raises(ValueError, match=reason) as info:
        infer_mode(name)
    assert "pass the rule explicitly" in str(info.value)


def test_best_forms():
    assert normalize_best(None) == ()
    assert normalize_best("acc") == (BestMetric("acc", "greater"),)
    assert normalize_best(["acc", "loss"]) == (
        BestMetric("acc", "greater"),
        BestMetric("loss", "less"),
    )
    assert normalize_best({"f1": "greater", "loss": None}) == (
        BestMetric("f1", "greater"),
        BestMetric("loss", "less"),
    )
    assert normalize_best([BestMetric("psnr", "greater")]) == (BestMetric("psnr", "greater"),)


@pytest.mark.parametrize(
    ("best", "exc", "match"),
    [
        ({"acc": "higher"}, ValueError, "'greater' or 'less'"),
        (["acc", "acc"], ValueError, "given twice"),
        (42, TypeError, "best must be"),
        ([3], TypeError, "metric names must be str"),
        ({"": "less"}, ValueError, "empty"),
        ({"a\nb": "less"}, ValueError, "control character"),
    ],
)
def test_bad_best(best, exc, match):
    with pytest.raises(exc, match=match):
        CheckpointerConfig(best=best)


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("../step_{step}.pt", "path separator"),
        ("/abs/step_{step}.pt", "path separator"),
        ("sub/{step}.pt", "path separator"),
        ("a\\{step}.pt", "path separator"),
        ("checkpoint.pt", "no {step} or {epoch}"),
        ("{iteration}.pt", "only {step} and {epoch}"),
        ("{step!r}.pt", "conversions"),
        ("{step.real}.pt", "only {step} and {epoch}"),
        ("{step[0]}.pt", "only {step} and {epoch}"),
        ("{step:q}.pt", "cannot format"),
        ("{step:/>4}.pt", "path separator"),  # a fill character can smuggle a separator in
        (".{step}.pt", "reserved for temporary files"),
        ("{step", "malformed"),
        ("x" * 300 + "{step}", "longer than 255"),
    ],
)
def test_bad_templates_are_rejected_up_front(template, match):
    with pytest.raises(ValueError, match=match):
        FilenameTemplate(template)
    with pytest.raises(ValueError, match=match):
        AsyncCheckpointer("unused", filename=template)


def test_template_rendering():
    t = FilenameTemplate("ep{epoch:02d}_it{step:06d}.pt")
    assert t.uses_step and t.uses_epoch
    assert t.render(42, 3) == "ep03_it000042.pt"
    with pytest.raises(ValueError, match="needs epoch="):
        t.render(42, None)


@pytest.mark.parametrize(
    ("options", "exc", "match"),
    [
        ({"queue_size": 0}, ValueError, "queue_size must be >= 1"),
        ({"queue_size": 1.5}, TypeError, "queue_size must be an int"),
        ({"keep_last": 0}, ValueError, "keep_last must be >= 1"),
        ({"keep_last": True}, TypeError, "keep_last must be an int"),
        ({"keep_every_n_minutes": 0}, ValueError, "> 0"),
        ({"keep_every_n_minutes": "5"}, TypeError, "must be a number"),
        ({"keep_period": 10}, ValueError, "keep_period only protects"),
        ({"when_full": "drop"}, ValueError, "'block', 'skip', 'coalesce'"),
        ({"on_exception": "ignore"}, ValueError, "'drain', 'abandon'"),
        ({"snapshot": "lazy"}, ValueError, "snapshot must be one of"),
        ({"max_retries": -1}, ValueError, "max_retries must be >= 0"),
        ({"retry_backoff": float("inf")}, ValueError, "retry_backoff"),
        ({"last_checkpoint": "yes"}, TypeError, "last_checkpoint must be a bool"),
        ({"filename": 5}, TypeError, "filename must be a str"),
    ],
)
def test_bad_options(options, exc, match):
    with pytest.raises(exc, match=match):
        CheckpointerConfig(**options)


def test_unknown_and_conflicting_options(tmp_path):
    with pytest.raises(TypeError, match="unknown option.*keep_lats"):
        AsyncCheckpointer(tmp_path, keep_lats=3)
    with pytest.raises(TypeError, match="either config= or keyword options"):
        AsyncCheckpointer(tmp_path, config=CheckpointerConfig(), keep_last=3)
    with pytest.raises(TypeError, match="must be a CheckpointerConfig"):
        AsyncCheckpointer(tmp_path, config={"keep_last": 3})
    with pytest.raises(TypeError, match="observer must be callable"):
        AsyncCheckpointer(tmp_path, observers=[42])
    with pytest.raises(TypeError, match="a path, a URI or a Storage"):
        AsyncCheckpointer(42)
    with pytest.raises(ValueError, match="no backend for nosuchproto://"):
        AsyncCheckpointer("nosuchproto://host/folder")
    with pytest.raises(TypeError, match="unexpected keyword"):
        AsyncCheckpointer(tmp_path, storage_options={"fsync_everything": True})


def test_config_object_is_frozen_and_reusable(tmp_path):
    config = CheckpointerConfig(keep_last=2, best="acc")
    with pytest.raises(AttributeError):
        config.keep_last = 5  # type: ignore[misc]
    with Checkpointer(tmp_path / "a", config=config) as a:
        assert a.config is config
    with Checkpointer(tmp_path / "b", config=config) as b:
        assert b.config.best == (BestMetric("acc", "greater"),)


def test_best_lookup_of_an_untracked_metric(tmp_path):
    with Checkpointer(tmp_path, best=["acc"]) as ckpt:
        assert ckpt.best("acc") is None
        with pytest.raises(ValueError, match="tracked metrics: 'acc'"):
            ckpt.best("loss")
