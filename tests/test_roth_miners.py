"""roth_* miners on hand-made batches (R: batchminer/*.py), the ALLOWED_MINING_OPS check,
the criterion's optimizer group, and no default upper cutoff."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dmlcore import registry
from dmlcore.config import ConfigError, from_dict
from dmlcore.losses.compat import check_loss_miner

ROOT = Path(__file__).resolve().parents[1]


def miner(name, **params):
    return registry.build("miner", name, params, embed_dim=2, train_seed=0)


def line_batch():
    # points on a line: anchor 0 (class 0) with mate 1 at distance 1.0
    x = torch.tensor([[0.0, 0], [1.0, 0], [1.1, 0], [3.0, 0], [0.5, 0], [5.0, 0]])
    y = torch.tensor([0, 0, 1, 1, 2, 2])
    return x, y


def test_semihard_picks_the_band_negative_else_random():
    x, y = line_batch()
    a, p, n = miner("roth_semihard", margin=0.2)(x, y)
    assert int(a[0]) == 0 and int(p[0]) == 1 and int(n[0]) == 2  # 1.0 < 1.1 < 1.2; 0.5 and 3.0 and 5.0 are outside
    seen = set()
    for e in range(40):  # anchor 5 (mate 4 at 4.5): band (4.5, 4.7) empty -> a random negative
        m = miner("roth_semihard", margin=0.2); m.set_epoch(e)
        seen.add(int(m(x, y)[2][5]))
    assert seen == {0, 1, 2, 3}


def test_softhard_sets():
    x, y = line_batch()
    for e in range(10):
        m = miner("roth_softhard"); m.set_epoch(e)
        a, p, n = m(x, y)
        # anchor 0: d_ap = 1.0, negatives at 1.1, 3, 0.5, 5 -> hard negatives (d < 1.0): {4}
        assert int(n[0]) == 4 and int(p[0]) == 1


def test_distance_keeps_mateless_anchor_with_itself_and_has_no_cutoff():
    x = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [-1.0, 0.05], [0.0, 1.0]]), dim=1)
    y = torch.tensor([0, 0, 1, 2])
    negs = set()
    for e in range(200):
        m = miner("roth_distance"); m.set_epoch(e)
        a, p, n = m(x, y)
        assert a.tolist() == [0, 1, 2, 3] and p[2] == 2 and p[3] == 3 and p[0] == 1
        negs.add(int(n[0]))
    assert 2 in negs  # d(0, 2) ~ 2 > 1.4: drawn, no upper cutoff
    for name in ("roth_distance", "roth_rho_distance", "roth_random_distance", "distance_weighted", "rho_distance"):
        params = registry.get("miner", name).params()
        assert params.get("upper_cutoff", params.get("nonzero_loss_cutoff")) is None


def test_rho_push_and_skip():
    x, y = line_batch()
    a, p, n = miner("roth_rho_distance", cp=1.0)(x, y)
    assert a.tolist() == list(range(6)) and p.tolist() == a.tolist()
    assert all(int(y[n[i]]) == int(y[a[i]]) and n[i] != a[i] for i in range(6))
    y2 = torch.tensor([0, 0, 1, 3, 2, 2])  # 2 and 3 have no mate: skipped
    a, p, n = miner("roth_rho_distance", cp=0.0)(x, y2)
    assert a.tolist() == [0, 1, 4, 5] and all(int(y2[n[i]]) != int(y2[a[i]]) for i in range(4))


def test_random_intra_npair_lifted_random_distance():
    x, y = line_batch()
    a, p, n = miner("roth_random")(x, y)
    assert len(a) == 6 and len({(int(i), int(j), int(k)) for i, j, k in zip(a, p, n)}) == 6
    assert all(y[i] == y[j] and i != j and y[i] != y[k] for i, j, k in zip(a, p, n))
    a, p, n = miner("roth_intra_random")(x, y)
    assert len(a) == 6 and all(y[i] == y[j] == y[k] for i, j, k in zip(a, p, n))
    a, p, neg = miner("roth_npair")(x, y)
    assert a.tolist() == list(range(6)) and neg.shape == (6, 6)
    assert neg[0].tolist() == [False, False, True, True, True, True] and p[0] == 1
    a, pos, neg = miner("roth_lifted")(x, y)
    assert pos[2].tolist() == [False, False, False, True, False, False]
    a, p, n = miner("roth_random_distance")(x, y)  # permuted labels: any mate pairs
    assert len(a) == 6 and all(p[i] != a[i] for i in range(6))


def test_miners_are_seeded():
    x, y = line_batch()
    runs = []
    for _ in range(2):
        m = miner("roth_random_distance"); m.set_epoch(4)
        runs.append([t.tolist() for t in m(x, y)])
    assert runs[0] == runs[1]


def test_allowed_mining_ops():
    check_loss_miner("roth_triplet", "roth_softhard")
    check_loss_miner("roth_npair", "roth_npair")
    check_loss_miner("roth_softmax", "none")
    for loss, m, word in [
        ("roth_npair", "roth_distance", "not allowed"),
        ("roth_triplet", "none", "needs a miner"),
        ("roth_softmax", "roth_distance", "not allowed"),
        ("roth_triplet", "roth_lifted", "not allowed"),
        ("margin", "roth_npair", "set tuples"),
    ]:
        with pytest.raises(ConfigError, match=word) as err:
            check_loss_miner(loss, m)
        assert "\n" not in str(err.value) and str(err.value).startswith("miner.name")


def test_criterion_param_group_has_reference_lr_and_no_weight_decay():
    from dmlcore.train import Trainer

    cfg = from_dict({
        "data": {"dataset": "glyphs", "root": None, "params": {"n_classes": 8}, "image_size": 16, "val_classes": 0},
        "model": {"backbone": "small_cnn", "backbone_params": {"width": 4, "depth": 1}, "embed_dim": 8, "freeze_bn": False},
        "loss": {"name": "roth_proxynca"}, "miner": {"name": "none"},
        "batch": {"size": 8, "samples_per_class": 2}, "train": {"epochs": 1, "device": "cpu"},
    })
    t = Trainer(cfg).build()
    group = [g for g in t.optimizer.param_groups if g.get("name") == "loss"][0]
    assert group["weight_decay"] == 0.0 and group["lr"] == pytest.approx(cfg.optim.lr * 50)
    model = [g for g in t.optimizer.param_groups if g.get("name") == "model"][0]
    assert model["weight_decay"] == cfg.optim.weight_decay


def _cli(*args):
    import os
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "sweeper.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)


@pytest.mark.parametrize("over, word", [
    (["loss.name=roth_npair", "miner.name=roth_distance"], "not allowed"),
    (["loss.name=roth_triplet", "miner.name=none"], "needs a miner"),
    (["loss.name=roth_triplet", "miner.name=roth_random", "loss.params={bogus: 1}"], "no parameter 'bogus'"),
])
def test_bad_input_exit_2_one_line(over, word):
    cfg = ROOT / "configs" / "quickstart.yaml"
    args = ["train", str(cfg), "--no-mlflow"]
    for o in over:
        args += ["--set", o]
    r = _cli(*args)
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and word in lines[0]


def test_list_shows_every_roth_entry():
    from dmlcore.losses.roth_criteria import ROTH_LOSSES

    out = _cli("list", "losses").stdout + _cli("list", "miners").stdout
    for name in ROTH_LOSSES + ("roth_random", "roth_semihard", "roth_softhard", "roth_distance", "roth_rho_distance",
                               "roth_npair", "roth_lifted", "roth_random_distance", "roth_intra_random"):
        assert name in out


def test_no_study_sets_an_upper_cutoff():
    for f in (ROOT / "studies").glob("*.yaml"):
        text = f.read_text()
        assert "nonzero_loss_cutoff: 1.4" not in text and "upper_cutoff: 1.4" not in text, f
        yaml.safe_load(text)
