"""Models saved before a default layout changed still load (with a warning), and nothing else
that does not fit loads silently."""

from __future__ import annotations

import inspect

import pytest
import torch

from hybridflow.models.realnvp import realnvp
from hybridflow.runs import CheckpointError, build_model_for, folder, resolve_config
from hybridflow.runs.folder import legacy_config, restore_model

INFO = {"shape": [1, 8, 8], "num_levels": 17, "num_classes": 10}
SMALL = {"num_scales": 2, "hidden_channels": 8, "num_res_blocks": 1}
DEFAULT = inspect.signature(realnvp).parameters["checkerboard_layout"].default
OTHER = {"masked": "gathered", "gathered": "masked"}[DEFAULT]


def _config(**backbone_args) -> dict:
    return resolve_config(base={"backbone": "realnvp", "backbone_args": {**SMALL, **backbone_args}})


@pytest.fixture
def other_is_legacy(monkeypatch):
    """Pretend the layout that is not today's default was the default before."""
    monkeypatch.setattr(folder, "LEGACY_BUILD_DEFAULTS", {"checkerboard_layout": OTHER})


def test_a_model_saved_with_the_earlier_default_is_rebuilt_with_it(other_is_legacy) -> None:
    torch.manual_seed(0)
    saved = build_model_for(_config(checkerboard_layout=OTHER), INFO)
    with pytest.warns(UserWarning, match=f"--backbone_args.checkerboard_layout={OTHER}"):
        model, config = restore_model(_config(), INFO, saved.state_dict(), "model.pt")
    assert config["backbone_args"]["checkerboard_layout"] == OTHER
    x = torch.randint(0, 17, (4, 1, 8, 8)).float()
    log_probs = []
    for m in (model.eval(), saved.eval()):
        torch.manual_seed(1)  # the same dequantization noise
        log_probs.append(m.flow.log_prob(x))
    torch.testing.assert_close(*log_probs)


def test_a_model_of_todays_layout_loads_without_a_warning(other_is_legacy, recwarn) -> None:
    saved = build_model_for(_config(), INFO)
    _, config = restore_model(_config(), INFO, saved.state_dict(), "model.pt")
    assert "checkerboard_layout" not in config["backbone_args"]
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_weights_that_fit_no_layout_are_refused(other_is_legacy) -> None:
    saved = build_model_for(_config(hidden_channels=4), INFO)
    with pytest.raises(CheckpointError, match="does not match the model its config describes"):
        restore_model(_config(), INFO, saved.state_dict(), "model.pt")


def test_legacy_config_fills_only_keywords_the_builders_take() -> None:
    assert legacy_config(_config(checkerboard_layout="masked")) is None
    coupling = resolve_config(base={"backbone": "coupling"})
    assert legacy_config(coupling) is None
    variational = resolve_config(base={"backbone": "coupling", "dequantization": "variational"})
    filled = legacy_config(variational)
    assert filled is not None and filled["backbone_args"] == {}
    assert set(filled["dequantization_args"]) == set(folder.LEGACY_BUILD_DEFAULTS)
