"""Data-parallel dmlcore (gloo, 2 CPU processes) equals one process on the same global batch.

One spawned pair of gloo processes (``torch.multiprocessing``, free port, a deadline so a
hang fails the test) runs every distributed case once (module fixture); each test then
computes the single-process reference with the plain trainer in this process and compares:

* two SGD steps of a tuple loss with a miner (``roth_margin`` + ``roth_distance``, with its
  learned beta) and of a proxy loss (``roth_proxynca``): the same step losses and the same
  parameters after every step, the model's and the criterion's, to 1e-6 -- with SGD, not
  Adam, so that a gradient off by a factor (the world size) cannot hide behind Adam's
  normalisation; frozen BatchNorm (the Roth protocol), and the updates themselves are
  checked to be far larger than the tolerance; the same with a storage sampler
  (``greedy_coreset``: its batches come from the gathered train embeddings);
* distributed evaluation: every metric (R@k, mAP@R, NMI, pi, rho, on test, val and train)
  equals the single-process evaluation of the same model, and the gathered embeddings
  equal the single-process ones row by row (shards of odd sizes, a subset in a scrambled
  order), on both ranks;
* a batch size not divisible by the world size, and ``train.sync_bn`` on CPU workers: one
  ``ConfigError`` line on every rank, before any collective (no hang).
"""

from __future__ import annotations

import socket
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch

from dmlcore.config import load_config
from dmlcore.train import ListReporter, Trainer

WORLD = 2
DEADLINE_S = 240

BASE = {
    "data.dataset": "digits",
    "data.image_size": 16,
    "data.augmentation": "none",
    "model.backbone": "small_cnn",
    "model.backbone_params": {"width": 8, "depth": 2},
    "model.freeze_bn": True,  # model.pretrained: a weight file with non-trivial BN statistics (fixture)
    "model.embed_dim": 16,
    "batch.size": 20,
    "batch.samples_per_class": 4,
    "batch.iterations_per_epoch": 1,
    "optim.name": "sgd",
    "optim.lr": 0.2,
    "optim.weight_decay": 0.0,
    "loss.lr": 0.5,
    "train.epochs": 2,
    "train.device": "cpu",
    "eval.every": 2,
    "eval.recall_k": [1, 2],
    "eval.clustering": False,
    "eval.embedding_metrics": False,
}

STEP_CASES = {
    "tuple_miner": {"loss.name": "roth_margin", "miner.name": "roth_distance"},
    "proxy": {"loss.name": "roth_proxynca", "miner.name": "none"},
    # a storage sampler: the train embeddings gathered to every rank, the rows refreshed per step
    "storage_sampler": {"loss.name": "roth_margin", "miner.name": "roth_distance", "batch.sampler": "greedy_coreset"},
    # a head's extra embeddings (the auxiliary CRT) are gathered like the main one; its own extra
    # loss (consistency, diversity: per slice, documented) is weighted 0 here
    "head_extra_embeddings": {
        "loss.name": "roth_margin", "miner.name": "roth_distance", "model.head": "crt",
        "model.head_params": {"prototypes": 4, "aux_prototypes": 3, "aux_dim": 6, "aux_metric_weight": 0.5,
                              "consistency_weight": 0.0, "diversity_weight": 0.0},
    },
}

EVAL = {  # odd split sizes: 11 test classes x 23 (253), train_eval 9 x 23 (207), val 2 x 23
    **BASE,
    "data.dataset": "glyphs",
    "data.params": {"n_classes": 22, "samples_per_class": 23},
    "data.val_classes": 0.2,
    "loss.name": "roth_margin",
    "miner.name": "roth_distance",
    "eval.clustering": True,
    "eval.embedding_metrics": True,
    "eval.recall_k": [1, 2, 4],
}

TRAINING_BN = {"model.freeze_bn": False}  # each rank normalises its slice; rank 0's running statistics

CLOSED = {"data.split": "closed", "eval.protocol": "closed_set", "eval.recall_k": [1, 2, 4]}  # test queries train

BAD = {
    "indivisible": {"batch.size": 15, "batch.samples_per_class": 3},
    "sync_bn_cpu": {"train.sync_bn": True},
}


def cfg(weights: str, over: dict) -> object:
    return load_config(None, {**BASE, "model.pretrained": weights, **over})


def eval_cfg(weights: str) -> object:
    return load_config(None, {**EVAL, "model.pretrained": weights})


SUBSET = np.arange(206, -1, -3)  # 69 train_eval rows, scrambled (reversed, strided)


# ---------------------------------------------------------------------------------
# the worker (runs in each spawned process)
# ---------------------------------------------------------------------------------

def _worker(rank: int, port: int, weights: str, out: str) -> None:
    import torch.distributed as dist

    from dmlcore import distributed
    from dmlcore.config import ConfigError

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))
    try:
        res: dict = {"rank": distributed.rank(), "world": distributed.world_size()}
        for name, over in STEP_CASES.items():
            rep = ListReporter()
            t = Trainer(cfg(weights, over), rep, progress=False)
            t.fit()
            res[name] = {"reports": rep.reports, "checkpoints": rep.checkpoints,
                         "model": t.model.state_dict(), "criterion": t.criterion.state_dict()}
        t = Trainer(cfg(weights, {**STEP_CASES["tuple_miner"], **TRAINING_BN}), progress=False)
        t.fit()
        res["training_bn"] = t.model.state_dict()
        t = Trainer(eval_cfg(weights), progress=False).build()
        res["eval"] = {
            "metrics": t.evaluate(),
            "all_test": t.embed(t.data.test)[0],  # outside an evaluation: gathered to every rank
            # inside one: requests served by every rank, gathered to rank 0
            "served": t.dp.evaluate(t, lambda: {"test": t.embed(t.data.test)[0], "sub": t.embed(t.data.train_eval, SUBSET)[0]}),
        }
        res["closed_eval"] = Trainer(cfg(weights, CLOSED), progress=False).build().evaluate()
        if rank == 0:  # one rank alone, no collective: must not hang
            with t.dp.local_embedding():
                res["eval"]["local_rank0"] = t.embed(t.data.test)[0]
        for name, over in BAD.items():
            try:
                Trainer(cfg(weights, over), progress=False).build()
                res[name] = None
            except ConfigError as err:
                res[name] = str(err)
        torch.save(res, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> str:
    """small_cnn weights whose BN statistics are far from 0/1 (frozen BN then matters)."""
    from dmlcore.models.backbones import SmallCNN

    torch.manual_seed(123)
    net = SmallCNN(8, 2)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.3)
            m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("ddp-weights") / "small_cnn.pt"
    torch.save(net.state_dict(), path)
    return str(path)


@pytest.fixture(scope="module")
def ranks(weights, tmp_path_factory) -> list[dict]:
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp-out")
    t0 = time.monotonic()
    ctx = mp.start_processes(_worker, args=(_free_port(), weights, str(out)), nprocs=WORLD, join=False, start_method="spawn")
    try:
        while not ctx.join(timeout=max(1.0, DEADLINE_S - (time.monotonic() - t0))):
            if time.monotonic() - t0 > DEADLINE_S:
                pytest.fail(f"the {WORLD} gloo workers did not finish within {DEADLINE_S} s (a hang)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


# ---------------------------------------------------------------------------------
# the tests
# ---------------------------------------------------------------------------------

def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def _trainable(state: dict, model: torch.nn.Module) -> dict:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in names}


def test_ranks_know_their_place(ranks):
    assert [r["rank"] for r in ranks] == [0, 1] and {r["world"] for r in ranks} == {WORLD}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_two_worker_steps_equal_one_process_steps(case, ranks, weights):
    run = cfg(weights, STEP_CASES[case])
    init = Trainer(run, progress=False).build()
    init_model = {k: v.clone() for k, v in init.model.state_dict().items()}
    init_crit = {k: v.clone() for k, v in init.criterion.state_dict().items()}
    rep = ListReporter()
    one = Trainer(run, rep, progress=False)
    one.fit()
    r0, r1 = ranks[0][case], ranks[1][case]

    # the same step losses (one step per epoch), reported identically by both ranks
    loss_1p = [m["train/loss"] for _, m in rep.reports]
    loss_2w = [m["train/loss"] for _, m in r0["reports"]]
    assert np.allclose(loss_2w, loss_1p, rtol=1e-6, atol=1e-6), (loss_2w, loss_1p)
    assert r0["reports"] == r1["reports"]  # every rank reports the same numbers, the same number of times
    assert [s for s, _ in r0["checkpoints"]] == [1, 2] and r1["checkpoints"] == []  # checkpoints: rank 0 only

    # the same parameters after each step: model and criterion (beta / proxies), on both ranks
    for (step, ck2), (_, ck1) in zip(r0["checkpoints"], rep.checkpoints):
        assert _max_diff(ck2["model"], ck1["model"]) < 1e-6, (case, step)
        assert _max_diff(ck2["criterion"], ck1["criterion"]) < 1e-6, (case, step)
    for r in (r0, r1):
        assert _max_diff(r["model"], one.model.state_dict()) < 1e-6
        assert _max_diff(r["criterion"], one.criterion.state_dict()) < 1e-6

    # ... and the updates are real: far above the tolerance, for the model and the criterion
    moved = _trainable(one.model.state_dict(), one.model)
    assert _max_diff(moved, {k: init_model[k] for k in moved}) > 1e-3
    assert init_crit and _max_diff(one.criterion.state_dict(), init_crit) > 1e-3
    # frozen BN: the running statistics are the weight file's, untouched
    bn = [k for k in init_model if k.endswith("running_var")]
    assert bn and all(torch.equal(r0["model"][k], init_model[k]) for k in bn)


def test_training_batchnorm_stays_in_sync_with_rank_0(ranks, weights):
    """Training BN (documented choice): slice statistics per rank, rank 0's running
    statistics everywhere after an evaluation, the parameters identical on every rank."""
    a, b = ranks[0]["training_bn"], ranks[1]["training_bn"]
    assert _max_diff(a, b) == 0.0
    init = Trainer(cfg(weights, {**STEP_CASES["tuple_miner"], **TRAINING_BN}), progress=False).build()
    stats = [k for k in a if k.endswith("running_mean")]
    assert stats and max(float((a[k] - init.model.state_dict()[k]).abs().max()) for k in stats) > 1e-3  # they trained


def test_distributed_evaluation_equals_single_process(ranks, weights):
    t = Trainer(eval_cfg(weights), progress=False).build()
    single = t.evaluate()
    e0, e1 = ranks[0]["eval"], ranks[1]["eval"]
    assert e0["metrics"] == e1["metrics"]  # every rank gets rank 0's metrics (the best epoch agrees)
    keys = {k for k in single if not k.startswith("time/")}
    assert keys == {k for k in e0["metrics"] if not k.startswith("time/")}
    for prefix in ("test/recall_at_4", "test/map_at_r", "test/nmi", "val/recall_at_1", "train/pi_ratio",
                   "train/rho_spectrum"):
        assert any(k.startswith(prefix) for k in keys), prefix
    diff = {k: abs(e0["metrics"][k] - single[k]) for k in keys}
    assert max(diff.values()) < 1e-6, sorted(diff.items(), key=lambda kv: -kv[1])[:3]

    # row by row: the gathered embeddings are the single-process ones, in the same order
    ref_test = t.embed(t.data.test)[0]
    ref_sub = t.embed(t.data.train_eval, SUBSET)[0]
    assert len(ref_test) == 253 and len(SUBSET) % 2 == 1
    for e in (e0, e1):
        assert (e["all_test"] - ref_test).abs().max() < 1e-6
        assert e["served"]["test"].shape == ref_test.shape
        assert (e["served"]["test"] - ref_test).abs().max() < 1e-6
        assert (e["served"]["sub"] - ref_sub).abs().max() < 1e-6
    assert (e0["local_rank0"] - ref_test).abs().max() < 1e-6 and "local_rank0" not in e1


def test_distributed_closed_set_evaluation_equals_single_process(ranks, weights):
    single = Trainer(cfg(weights, CLOSED), progress=False).build().evaluate()
    m0, m1 = ranks[0]["closed_eval"], ranks[1]["closed_eval"]
    assert m0 == m1
    keys = {k for k in single if not k.startswith("time/")}
    assert "test/recall_at_4" in keys and keys == {k for k in m0 if not k.startswith("time/")}
    assert max(abs(m0[k] - single[k]) for k in keys) < 1e-6


def test_bad_world_size_input_is_one_line_on_every_rank(ranks):
    for r in ranks:
        assert r["indivisible"] == (
            "batch.size=15 is not divisible by the 2 workers of this trial (each worker trains on an equal "
            "slice of the global batch); use a multiple of 2"
        )
        assert r["sync_bn_cpu"].startswith("train.sync_bn: SyncBatchNorm runs on CUDA only") and "\n" not in r["sync_bn_cpu"]


@pytest.mark.parametrize("n,world", [(12, 2), (12, 3), (7, 2), (1, 4)])
def test_shard_order_round_trip(n, world):
    """Strided shards concatenated in rank order, put back: the original order (brute force)."""
    from dmlcore.distributed import global_order, shard, unshard

    rows = torch.arange(n * 2).view(n, 2)
    shards = [shard(n, r, world) for r in range(world)]
    assert sorted(np.concatenate(shards).tolist()) == list(range(n))  # disjoint, complete
    cat = torch.cat([rows[torch.as_tensor(s, dtype=torch.long)] for s in shards])
    assert torch.equal(unshard(cat, world), rows)
    if n % world == 0:  # the training batch: equal slices
        assert torch.equal(cat[global_order(n, world)], rows)
