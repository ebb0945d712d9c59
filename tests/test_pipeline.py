"""End-to-end check of the DVC pipeline with the quick profile, in a scratch copy of the repository.

Runs every notebook through ``dvc repro``, then checks that an unchanged pipeline reruns no
stage and that changing one parameter marks (and reruns) only the stage that reads it. Stages
downstream of a rerun stage are not marked until their inputs have changed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MIRROR = Path(os.environ.get("SPIKELIB_DATA_DIR") or ROOT.parent / "shared" / "data")

pytestmark = [
    pytest.mark.pipeline,
    pytest.mark.skipif(not MIRROR.is_dir(), reason=f"data mirror not found at {MIRROR}"),
]

EXPECTED_FIGURES = ("fig1_layer_max", "fig2_token_scales", "fig4_qfem_tradeoff", "smoothquant", "granularity",
                    "module_ablation", "prefix_ablation", "fig5_zeroshot", "zoo_calibration", "zoo_main", "int8_cost")
NOTEBOOKS = ("01_calibration", "02_main_results", "03_smoothquant", "04_granularity", "05_module_ablation",
             "06_prefix_ablation", "07_zeroshot", "08_zoo_calibration", "09_zoo_main", "10_int8_cost")
PAPER_TASKS = ["piqa", "lambada_openai", "hellaswag", "winogrande"]
METHODS = ["FP32", "W8A8", "W8A8+QFeP", "W8A8+QFeM", "W8A8+QFeM+QFeP"]


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


def _dvc(arguments: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = _run([sys.executable, "-m", "dvc", *arguments], cwd)
    assert result.returncode == 0, f"dvc {' '.join(arguments)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _changed_stages(cwd: Path) -> set[str]:
    status = json.loads(_dvc(["status", "--json"], cwd).stdout or "{}")
    return set(status)


def _write_params(path: Path) -> None:
    params = yaml.safe_load((ROOT / "profiles" / "quick.yaml").read_text())
    params["data"]["dir"] = str(MIRROR)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


def _edit_params(path: Path, edit) -> None:
    params = yaml.safe_load(path.read_text())
    edit(params)
    path.write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.fixture(scope="module")
def pipeline_copy(tmp_path_factory) -> Path:
    """A scratch copy of the repository's tracked and untracked source files, after one ``dvc repro``."""
    copy = tmp_path_factory.mktemp("pipeline")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.splitlines()
    for relative in listed:
        source = ROOT / relative
        if source.is_file() and not relative.startswith(("results/", "figures/")) and relative != "dvc.lock":
            (copy / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, copy / relative)
    subprocess.run(["git", "init", "-q"], cwd=copy, check=True)
    _write_params(copy / "params.yaml")

    _dvc(["repro"], copy)
    return copy


def test_repro_writes_figures(pipeline_copy):
    for stem in EXPECTED_FIGURES:
        for extension in ("png", "pdf"):
            path = pipeline_copy / "figures" / f"{stem}.{extension}"
            assert path.is_file(), f"missing {path}"
            assert path.stat().st_size > 1000, f"{path} is suspiciously small"


def test_repro_writes_main_table(pipeline_copy):
    table = pd.read_csv(pipeline_copy / "results" / "main" / "main_table.csv")
    assert table["method"].tolist() == METHODS
    assert table["n_tokens"].nunique() == 1
    assert (table["ppl"] > 1).all()
    payload = json.loads((pipeline_copy / "results" / "main" / "main_table.json").read_text())
    assert payload["provenance"]["parameters"]["ppl_windows"] == 3
    assert payload["provenance"]["versions"]["torch"]


def test_executed_notebooks_saved(pipeline_copy):
    for name in NOTEBOOKS:
        notebook = json.loads((pipeline_copy / "results" / "notebooks" / f"{name}.ipynb").read_text())
        assert notebook["metadata"]["papermill"]["exception"] in (None, False)


def test_unchanged_pipeline_reruns_nothing(pipeline_copy):
    assert _changed_stages(pipeline_copy) == set()


def test_zeroshot_tables_written(pipeline_copy):
    main = pd.read_csv(pipeline_copy / "results" / "main" / "main_table.csv")
    for task in PAPER_TASKS:
        assert main[f"acc_{task}"].between(0, 1).all()
    assert main["avg_acc_paper_tasks"].between(0, 1).all()
    assert (main["wikitext_token_ppl"] > 1).all()
    assert (main["zeroshot_docs_per_task"] == 2).all()

    rows = pd.read_csv(pipeline_copy / "results" / "main" / "zeroshot.csv")
    assert set(rows["method"]) == set(METHODS)
    assert set(rows["task"]) == set(PAPER_TASKS) | {"arc_easy", "arc_challenge", "boolq", "wikitext"}
    summary = pd.read_csv(pipeline_copy / "results" / "zeroshot" / "summary.csv")
    assert summary["method"].tolist() == METHODS
    assert summary["paper_average_acc"].between(0, 1).all()


def test_study_tables_written(pipeline_copy):
    smoothquant = pd.read_csv(pipeline_copy / "results" / "smoothquant" / "table.csv")
    assert smoothquant["method"].tolist() == ["FP", "W8A8", "W8A8+QFeM", "W8A8+QFeP", "W8A8+QFeM+QFeP", "W8A8+SQ",
                                              "W8A8+SQ+QFeM", "W8A8+SQ+QFeP", "W8A8+SQ+QFeM+QFeP"]
    granularity = pd.read_csv(pipeline_copy / "results" / "granularity" / "table.csv")
    assert set(granularity["granularity"]) == {"none", "per-tensor", "per-token", "static"}
    modules = pd.read_csv(pipeline_copy / "results" / "module_ablation" / "table.csv")
    assert modules["group"].fillna("").tolist() == ["", "", "top", "middle", "bottom"]
    prefixes = pd.read_csv(pipeline_copy / "results" / "prefix_ablation" / "table.csv")
    assert prefixes["variant"].tolist() == ["FP", "none", "start token", "start + spike token", "searched", "random 1"]
    for table in (smoothquant, granularity, modules, prefixes):
        assert table["n_tokens"].nunique() == 1
        assert (table["ppl"] > 1).all()


def test_one_parameter_reruns_one_stage(pipeline_copy):
    scales = pipeline_copy / "results" / "calibration" / "token_scales.pt"
    main_table = pipeline_copy / "results" / "main" / "main_table.csv"
    before = scales.stat().st_mtime_ns, main_table.stat().st_mtime_ns

    _edit_params(pipeline_copy / "params.yaml", lambda p: p["module_ablation"].update(ppl_windows=1))
    assert _changed_stages(pipeline_copy) == {"module_ablation"}
    _dvc(["repro"], pipeline_copy)

    assert (scales.stat().st_mtime_ns, main_table.stat().st_mtime_ns) == before
    table = pd.read_csv(pipeline_copy / "results" / "module_ablation" / "table.csv")
    assert table["n_tokens"].iloc[0] == 128
    assert _changed_stages(pipeline_copy) == set()


def test_zoo_tables_written(pipeline_copy):
    calibration = pd.read_csv(pipeline_copy / "results" / "zoo" / "calibration_summary.csv")
    assert calibration["model"].tolist() == ["smollm2-135m", "qwen2.5-0.5b"]
    # Qwen2.5 has no BOS of its own: its windows open with the end-of-document token <|endoftext|>.
    assert calibration["start_token"].tolist() == ["<|im_start|>", "<|endoftext|>"]
    assert calibration["fits_float16"].all()
    for name in ("smollm2-135m", "qwen2.5-0.5b"):
        assert (pipeline_copy / "figures" / "zoo_calibration" / f"{name}.png").is_file()
        assert (pipeline_copy / "results" / "zoo" / "scales" / f"{name}.pt").is_file()
    main = pd.read_csv(pipeline_copy / "results" / "zoo" / "main_table.csv")
    assert main["method"].tolist() == METHODS + ["FP32+prefix"]
    assert set(main["model"]) == {"qwen2.5-0.5b"}
    assert json.loads(main["prefix"].iloc[0])[0] == "<|endoftext|>"
    assert (main["ppl"] > 1).all()
    assert main["n_tokens"].nunique() == 1


def test_int8_tables_written(pipeline_copy):
    from spikelib.plan import QuantizationPlan

    results = pipeline_copy / "results" / "int8"
    summary = pd.read_csv(results / "summary.csv")
    assert summary["method"].tolist() == ["fp", "w8a8", "w8a8+qfem", "w8a8+qfep", "w8a8+qfem+qfep", "torchao",
                                          "torchao+qfem+qfep"]
    assert (summary["prefill_ms"] > 0).all()
    w8a8 = summary.set_index("method").loc["w8a8"]
    assert w8a8["weight_ratio_vs_fp"] > 3.5
    prefill = pd.read_csv(results / "prefill.csv")
    assert sorted(prefill["seq_len"].unique()) == [32, 64]
    agreement = pd.read_csv(results / "agreement.csv")
    assert agreement["method"].tolist() == ["w8a8", "w8a8+qfem+qfep"]
    assert agreement["int8_ppl"].gt(1).all()
    attention = pd.read_csv(results / "prefix_attention.csv")
    assert len(attention) == 3
    chosen = QuantizationPlan.load(results / "plans" / "smollm2-135m.json")
    selection = json.loads((pipeline_copy / "results" / "main" / "qfem_selection.json").read_text())
    assert chosen.full_precision_modules == sorted(selection["modules"])
    assert chosen.prefix_ids[0] == 1  # the start token <|im_start|> opens the prefix
    assert len(chosen.input_absmax) == 30 * 7


@pytest.mark.parametrize("section, key, value", [("main_results", "ppl_windows", 2), ("calibration", "n_windows", 3),
                                                 ("zoo_main", "ppl_windows", 2), ("int8_cost", "repeats", 2)])
def test_parameter_marks_its_stage(pipeline_copy, section, key, value):
    params = pipeline_copy / "params.yaml"
    original = params.read_text()
    try:
        _edit_params(params, lambda p: p[section].update({key: value}))
        assert _changed_stages(pipeline_copy) == {section}
    finally:
        params.write_text(original)
    assert _changed_stages(pipeline_copy) == set()
