"""Every profile names parameters that the stage notebooks declare, so a switch of profile cannot fail late."""

from __future__ import annotations

from pathlib import Path

import papermill
import pytest
import yaml

from spikelib import models, pipeline

ROOT = Path(__file__).resolve().parents[1]
PROFILES = sorted((ROOT / "profiles").glob("*.yaml"))


def test_profiles_found():
    assert {path.stem for path in PROFILES} >= {"default", "quick", "full", "paper"}


def test_params_is_the_default_profile():
    assert yaml.safe_load((ROOT / "params.yaml").read_text()) == yaml.safe_load((ROOT / "profiles" / "default.yaml").read_text())


@pytest.mark.parametrize("profile", PROFILES, ids=lambda path: path.stem)
def test_profile_matches_the_notebooks(profile):
    params = pipeline.load_params(profile)
    for stage, notebook in pipeline.STAGES.items():
        assert stage in params, f"{profile.name} has no {stage} section"
        declared = papermill.inspect_notebook(str(ROOT / notebook))
        parameters = pipeline.stage_parameters(params, stage)
        assert set(parameters) <= set(declared), f"{profile.name}: {stage} keys not in {notebook}"


@pytest.mark.parametrize("profile", PROFILES, ids=lambda path: path.stem)
def test_zoo_main_models_are_calibrated(profile):
    params = yaml.safe_load(profile.read_text())
    assert set(params["zoo_main"]["model_names"]) <= set(params["zoo_calibration"]["model_names"])
    assert params["model"]["name"] not in params["zoo_main"]["model_names"]


def test_embedded_profiles_use_the_zoo():
    for name in ("default", "quick", "full"):
        params = yaml.safe_load((ROOT / "profiles" / f"{name}.yaml").read_text())
        assert set(params["zoo_calibration"]["model_names"]) <= set(models.ZOO)


def test_paper_profile_lists_the_paper_families():
    params = yaml.safe_load((ROOT / "profiles" / "paper.yaml").read_text())
    names = " ".join(params["zoo_calibration"]["model_names"]).lower()
    for fragment in ("llama-2-7b", "llama-2-13b", "mistral-7b", "mixtral-8x7b", "solar", "gemma", "opt-13b", "mpt-7b"):
        assert fragment in names
    assert params["model"]["device"] == "cuda"
    assert params["data"]["dir"] == ""
    # bfloat16 has the float32 range, so no model of the list can overflow it.
    assert params["model"]["dtype"] == "bfloat16"
