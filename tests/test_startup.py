"""A trial's start-up: what a fresh process executes to train (issue 20; docs/scale.md).

Each check runs in a fresh interpreter (the modules a test process already holds would
hide an import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fresh(code: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


LOADED = """
import sys
def loaded(name):  # its code ran: scipy.stats defines rankdata, json defines dumps
    m = sys.modules.get(name)
    return m is not None and any(k in m.__dict__ for k in ("rankdata", "binom", "dumps"))
"""


def test_a_pml_trial_does_not_execute_scipy_stats():
    """A tiny trial (PML multi-similarity loss and miner, embedding-space metrics, rho)
    trains and evaluates without running scipy.stats or scipy.special; PML's one use of
    scipy.stats still works."""
    out = _fresh(LOADED + """
import json, sys
import numpy as np
from dmlcore.config import from_dict
from dmlcore.train import Trainer
cfg = from_dict({"name": "t", "data": {"dataset": "digits", "image_size": 16, "augmentation": "none"},
    "model": {"backbone": "small_cnn", "backbone_params": {"width": 8, "depth": 1}, "embed_dim": 8},
    "loss": {"name": "multi_similarity"}, "miner": {"name": "multi_similarity"},
    "batch": {"size": 24, "samples_per_class": 8, "iterations_per_epoch": 2},
    "train": {"epochs": 1, "device": "cpu"},
    "eval": {"recall_k": [1], "clustering": False, "embedding_metrics": True, "pictures": False, "log_model": False}})
res = Trainer(cfg, progress=False).fit()
during = loaded("scipy.stats") or loaded("scipy.special")
assert "pytorch_metric_learning" in sys.modules
from pytorch_metric_learning.utils import common_functions as c_f
ranks = c_f.make_label_to_rank_dict([30, 10, 20])   # calls scipy.stats.rankdata
print(json.dumps({"during": during, "after": loaded("scipy.stats"),
                  "ranks": {str(k): int(v) for k, v in ranks.items()}, "keys": sorted(res.final)}))
""")
    assert out["during"] is False
    assert out["after"] is True and out["ranks"] == {"30": 2, "10": 0, "20": 1}
    assert any("rho" in k for k in out["keys"]), out["keys"]


def test_lazy_module_is_the_real_module_on_use():
    out = _fresh(LOADED + """
import json, sys
from dmlcore.lazy import lazy_module
import json as already
same = lazy_module("json") is already
missing = lazy_module("no_such_module_dml") is None and "no_such_module_dml" not in sys.modules
from dmlcore.lazy import is_loaded
m = lazy_module("scipy.stats")
lazy_before = not loaded("scipy.stats") and not is_loaded("scipy.stats")
import scipy
import scipy.stats as st                 # an import statement reads __spec__: still not run
still = not loaded("scipy.stats")
import scipy.stats._qmc                  # a submodule needs only the package's __path__
from scipy.stats import rankdata         # a name it defines: runs it
import threading
got = []
ts = [threading.Thread(target=lambda: got.append(st.norm.cdf(0.0))) for _ in range(4)]
[t.start() for t in ts]; [t.join() for t in ts]
try:
    st.no_such_name
    err = None
except AttributeError as e:
    err = str(e)
print(json.dumps({"same": same, "missing": missing, "lazy_before": lazy_before, "still": still,
                  "one": m is st and scipy.stats is st and sys.modules["scipy.stats"] is st,
                  "rank": rankdata([3.0, 1.0, 2.0]).tolist(), "loaded": loaded("scipy.stats") and is_loaded("scipy.stats"),
                  "threads": got, "err": err, "hook_left": "__getattr__" in st.__dict__}))
""")
    assert out["err"] and "no_such_name" in out["err"]
    del out["err"]
    assert out == {"same": True, "missing": True, "lazy_before": True, "still": True, "one": True,
                   "rank": [3.0, 1.0, 2.0], "loaded": True, "threads": [0.5] * 4, "hook_left": False}
