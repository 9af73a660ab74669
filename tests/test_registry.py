"""Registries: lookup with did-you-mean, parameter checking, context injection."""

import pytest

from dmlcore import registry
from dmlcore.registry import RegistryError


@registry.register("regularizer", "_test_entry", context=("embed_dim",))
def _entry(alpha: float = 1.0, beta: int = 2, embed_dim: int = 0):
    """A test entry.

    More text."""
    return (alpha, beta, embed_dim)


def test_build_with_params_and_context():
    assert registry.build("regularizer", "_test_entry", {"alpha": 3.0}, embed_dim=7, other=1) == (3.0, 2, 7)


def test_unknown_param_is_one_line_with_hint():
    with pytest.raises(RegistryError) as e:
        registry.build("regularizer", "_test_entry", {"alpah": 1}, key="loss.regularizers._test_entry")
    msg = str(e.value)
    assert "loss.regularizers._test_entry.alpah" in msg and "did you mean 'alpha'" in msg
    assert "embed_dim" not in msg.split("parameters:")[1]  # context args are not user params


def test_unknown_name_did_you_mean():
    with pytest.raises(RegistryError) as e:
        registry.get("regularizer", "_test_entyr", key="loss.regularizers")
    assert "did you mean '_test_entry'" in str(e.value)
    assert str(e.value).startswith("loss.regularizers: unknown regularizer")


def test_describe_lists_params_and_doc():
    rows = {name: (params, doc) for name, params, doc in registry.describe("regularizer")}
    assert rows["_test_entry"] == ({"alpha": 1.0, "beta": 2}, "A test entry.")


def test_double_registration_rejected():
    with pytest.raises(ValueError, match="registered twice"):
        registry.register("regularizer", "_test_entry")(lambda: None)
