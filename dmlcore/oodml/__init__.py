"""ooDML (Milbich et al. 2021): FID-graded class splits and few-shot DML.

``fid``: Fréchet distance between Gaussians / feature sets; ``splits``: class means of
a fixed encoder and the swap/removal split sequence (``make_splits``); ``fewshot``:
few-shot adaptation and evaluation on the test split (``few_shot_eval``).
"""

from .fid import fid_between, frechet_distance

__all__ = ["fid_between", "frechet_distance", "make_splits", "few_shot_eval"]


def __getattr__(name: str):  # lazy: keep ``import dmlcore.oodml`` light
    if name == "make_splits":
        from .splits import make_splits

        return make_splits
    if name == "few_shot_eval":
        from .fewshot import few_shot_eval

        return few_shot_eval
    raise AttributeError(name)
