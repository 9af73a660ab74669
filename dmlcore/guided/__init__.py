"""Guided DML (Gonzalez-Zapata et al. 2022, arXiv:2206.02029; code G-DML/Guided-Deep-Metric-Learning),
as its authors wrote it, in one package.

1. :mod:`.triplets`: the master's seeded class-pair triplet set (one ordered class pair per batch).
2. :mod:`.master`: the master, one conv branch per class plus a shared head, routed by the label;
   its loss ``(1-beta) Triplet(m) + beta mean||local_a - local_p||`` and its SGD training.
3. :mod:`.targets`: the master as a stage of the student's run: trained on first use, cached per
   seed and master config, and every train image embedded once through its own class's branch.
4. :mod:`.losses`: loss ``gdml_regression``, the student's mean L2 distance to its targets.

Not the paper's method, kept as options named for what they are: :mod:`.relational`
(regulariser ``relational_distillation``) and :mod:`.multibranch` (head ``multi_branch``).
:mod:`.checkpoints` saves and loads an embedding model with its config.

Importing the package imports every module in it (the registry entries).
"""

import importlib as _importlib
import pkgutil as _pkgutil

from .checkpoints import MODEL_FORMAT, load_embedding_model, save_model_checkpoint

for _m in sorted(_pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if not _m.name.startswith("_"):
        _importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["MODEL_FORMAT", "load_embedding_model", "save_model_checkpoint"]
