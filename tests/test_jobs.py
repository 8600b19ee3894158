"""JobStore: recipes' per-job results kept beside their reports, reused only with equal settings."""

import math
from pathlib import Path

import pytest
import torch

from hybridflow.experiments import JobStore
from hybridflow.reports import cpu_description

SETTINGS = {"dataset": "digits", "seed": 0, "hidden": (64, 64), "lr": 1e-3}


def test_a_saved_result_comes_back_with_its_cpu(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs")
    assert store.load("digits-s0", SETTINGS) is None  # nothing stored yet
    store.save("digits-s0", SETTINGS, {"bpd": 2.0123456789, "curve": [[1, 0.5]]})
    # tuples in the settings are stored as lists: the same settings still match
    assert store.load("digits-s0", SETTINGS) == {
        "bpd": 2.0123456789,
        "curve": [[1, 0.5]],
        "cpu": cpu_description(),
    }
    assert store.names() == ["digits-s0"]
    assert not list((tmp_path / "jobs").glob("*.partial"))


@pytest.mark.parametrize("changed", [{"seed": 1}, {"lr": 2e-3}, {"hidden": (64,)}, {"extra": None}])
def test_other_settings_redo_the_job_and_say_which(tmp_path: Path, changed: dict, capsys) -> None:
    store = JobStore(tmp_path)
    store.save("job", SETTINGS, {"bpd": 2.0})
    assert store.load("job", {**SETTINGS, **changed}) is None
    message = f"job job: stored with other {next(iter(changed))}; redoing it"
    assert message in capsys.readouterr().err


def test_names_with_colons_and_slashes_stay_in_the_folder(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs")
    path = store.save("synthetic:1x16x16/a-s0", SETTINGS, {"x": 1})
    assert path.parent == tmp_path / "jobs" and path.name == "synthetic_1x16x16_a-s0.json"
    assert store.load("synthetic:1x16x16/a-s0", SETTINGS) == {"x": 1, "cpu": cpu_description()}
    for bad in ("", ".hidden"):
        with pytest.raises(ValueError, match="job name"):
            store.path(bad)
    # another job whose name maps to the same file is named, not given this one's result
    with pytest.raises(ValueError, match="holds job 'synthetic:1x16x16/a-s0', not"):
        store.load("synthetic_1x16x16_a-s0", SETTINGS)


@pytest.mark.parametrize("text", ["{not json", '{"settings": {}}', "[1, 2]", ""])
def test_a_damaged_job_file_is_named_not_silently_redone(tmp_path: Path, text: str) -> None:
    store = JobStore(tmp_path)
    store.path("job").write_text(text)
    with pytest.raises(ValueError, match=r"job\.json is not a job file.*delete it"):
        store.load("job", SETTINGS)


def test_non_finite_results_are_kept_and_bad_values_named(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    diverged = {"kl": float("inf"), "curve": [[1, float("nan")], [2, -float("inf")]]}
    store.save("job", SETTINGS, diverged)  # a diverged fit is a result: not redone every run
    back = store.load("job", SETTINGS)
    assert back["kl"] == float("inf") and back["curve"][1] == [2, -float("inf")]
    assert math.isnan(back["curve"][0][1])
    with pytest.raises(ValueError, match="job other: settings must be JSON values with finite"):
        store.save("other", {**SETTINGS, "lr": float("nan")}, {"bpd": 2.0})
    with pytest.raises(ValueError, match="job other: the result cannot be stored as JSON"):
        store.save("other", SETTINGS, {"bpd": torch.tensor(2.0)})
    with pytest.raises(ValueError, match="job other: settings must be JSON"):
        store.load("other", {**SETTINGS, "root": Path("data")})
    assert store.names() == ["job"]


def test_run_names_follow_the_settings(tmp_path: Path) -> None:
    store = JobStore(tmp_path)
    name = store.run_name("synthetic:1x16x16-s0", SETTINGS)
    prefix = "synthetic_1x16x16-s0-"  # the job file's stem, then 8 hex digits of the settings
    assert name.startswith(prefix) and len(name) == len(prefix) + 8
    assert store.run_name("synthetic:1x16x16-s0", {**SETTINGS, "hidden": [64, 64]}) == name
    assert store.run_name("synthetic:1x16x16-s0", {**SETTINGS, "seed": 1}) != name
