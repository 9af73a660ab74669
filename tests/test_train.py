"""The trainer: learns, is deterministic, resumes exactly, refuses foreign checkpoints, stops on NaN."""

import math

import pytest
import torch

from dmlcore import registry
from dmlcore.config import load_config
from dmlcore.train import CheckpointError, ListReporter, Trainer, TrainingDiverged, load_checkpoint, save_checkpoint

TINY = {
    "data.dataset": "digits",
    "data.image_size": 16,
    "data.augmentation": "none",
    "model.backbone": "small_cnn",
    "model.backbone_params": {"width": 16, "depth": 2},
    "model.embed_dim": 32,
    "batch.size": 40,
    "batch.samples_per_class": 8,
    "optim.lr": 1e-3,
    "train.epochs": 2,
    "train.device": "cpu",
    "eval.recall_k": [1, 2],
    "eval.clustering": False,
}


def cfg(**over):
    return load_config(None, {**TINY, **{k.replace("__", "."): v for k, v in over.items()}})


def test_learns_on_glyphs_and_reports_best():
    """Zero-shot Recall@1 on unseen glyph classes rises far above the untrained model's."""
    rep = ListReporter()
    run = cfg(
        data__dataset="glyphs", data__params={"n_classes": 100}, data__image_size=32,
        model__backbone_params={}, loss__name="multi_similarity", train__epochs=4, eval__every=2,
        eval__on_init=True, batch__size=48, batch__samples_per_class=4,
    )
    res = Trainer(run, rep, progress=False).fit()
    init = rep.reports[0][1]["init/test/recall_at_1"]
    assert res.final["test/recall_at_1"] > init + 0.1, (init, res.final)
    last_step, last = rep.reports[-1]
    assert last_step == 4 and last["best_epoch"] == 4  # select_on=last
    assert last["best/test/recall_at_1"] == res.best["test/recall_at_1"]
    assert {"train/loss", "train/pi_ratio", "train/rho_spectrum", "test/map_at_r"} <= set(last)
    assert [s for s, _ in rep.checkpoints] == [1, 2, 3, 4]
    assert "test/recall_at_1" not in rep.reports[1][1]  # epoch 1 is not an evaluation epoch


def test_same_seed_same_metrics_other_seed_differs():
    a = Trainer(cfg(), progress=False).fit().final
    b = Trainer(cfg(), progress=False).fit().final
    c = Trainer(cfg(train__seed=1), progress=False).fit().final
    assert a == b
    assert a != c


def test_resume_continues_exactly(tmp_path):
    full = Trainer(cfg(), progress=False).fit()
    rep = ListReporter()
    Trainer(cfg(), rep, progress=False).fit()
    path = save_checkpoint(rep.checkpoints[0][1], tmp_path / "ckpt" / "checkpoint.pt")
    resumed = Trainer(cfg(), progress=False).fit(resume=path.parent)
    assert resumed.final == full.final
    assert len(resumed.history) == 2


def test_checkpoint_of_other_config_refused(tmp_path):
    rep = ListReporter()
    Trainer(cfg(train__epochs=1), rep, progress=False).fit()
    path = save_checkpoint(rep.checkpoints[-1][1], tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match="another config"):
        Trainer(cfg(model__embed_dim=16), progress=False).fit(resume=path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "junk.pt")


class _NaN(torch.nn.Module):
    def forward(self, embeddings, labels, **_):
        return embeddings.sum() * math.nan


registry.register("regularizer", "_nan_for_tests")(lambda: _NaN())


def test_nan_loss_raises_clear_error():
    with pytest.raises(TrainingDiverged, match=r"loss became nan at epoch 1"):
        Trainer(cfg(loss__regularizers={"_nan_for_tests": {"weight": 1.0}}), progress=False).fit()


def test_proxy_loss_gets_its_own_param_group():
    t = Trainer(cfg(loss__name="proxy_anchor", train__epochs=1), progress=False).build()
    groups = {g["name"]: g for g in t.optimizer.param_groups}
    assert groups["loss"]["lr"] == pytest.approx(1e-3 * 100)
    before = [p.detach().clone() for p in groups["loss"]["params"]]
    t.fit()
    assert any(not torch.equal(b, p) for b, p in zip(before, groups["loss"]["params"]))


def test_few_shot_metrics_come_with_the_last_report():
    rep = ListReporter()
    Trainer(cfg(train__epochs=1, eval__few_shot={"shots": [2], "episodes": 2, "steps": 2}), rep, progress=False).fit()
    last = rep.reports[-1][1]
    assert 0.0 <= last["fewshot/2shot/recall_at_1"] <= 1.0
    assert last["fewshot/2shot/episodes"] == 2 and "fewshot/2shot/zero_shot_recall_at_1" in last


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one():
    """``train.compile: true`` trains through ``torch.compile`` (inductor, here on the CPU)
    and reaches the eager run's numbers (same seed, same batches)."""
    import shutil

    pytest.importorskip("torch._inductor")
    if not (shutil.which("c++") or shutil.which("g++")):
        pytest.skip("torch.compile on the CPU needs a C++ compiler (c++/g++)")
    small = dict(train__epochs=1, batch__iterations_per_epoch=4, model__embed_dim=8)
    eager = Trainer(cfg(**small), progress=False).fit()
    tr = Trainer(cfg(**small, train__compile=True), progress=False)
    compiled = tr.fit()
    assert tr.step_model is not tr.model and type(tr.step_model).__name__ == "OptimizedModule"
    for key in ("train/loss", "test/recall_at_1"):
        assert compiled.final[key] == pytest.approx(eager.final[key], abs=1e-4), key
