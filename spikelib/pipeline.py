"""Run one pipeline stage: execute its notebook with papermill, parameters taken from params.yaml.

``python -m spikelib.pipeline STAGE [--params params.yaml]`` is the command of every stage in
dvc.yaml. The executed notebook is written to ``results/notebooks/`` atomically.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

import yaml

from .artifacts import atomic_path

logger = logging.getLogger(__name__)

STAGES = {
    "calibration": "notebooks/01_calibration.ipynb",
    "main_results": "notebooks/02_main_results.ipynb",
    "smoothquant": "notebooks/03_smoothquant.ipynb",
    "granularity": "notebooks/04_granularity.ipynb",
    "module_ablation": "notebooks/05_module_ablation.ipynb",
    "prefix_ablation": "notebooks/06_prefix_ablation.ipynb",
    "zeroshot": "notebooks/07_zeroshot.ipynb",
    "zoo_calibration": "notebooks/08_zoo_calibration.ipynb",
    "zoo_main": "notebooks/09_zoo_main.ipynb",
    "int8_cost": "notebooks/10_int8_cost.ipynb",
}
EXECUTED_DIR = Path("results/notebooks")


def load_params(path: str | Path = "params.yaml") -> dict[str, Any]:
    """Read a params file and check that it has the sections every stage reads."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    params = yaml.safe_load(path.read_text()) or {}
    missing = [key for key in ("model", "data", "seed") if key not in params]
    if missing:
        raise ValueError(f"{path} is missing the section(s) {', '.join(missing)}; see profiles/default.yaml")
    return params


def stage_parameters(params: dict[str, Any], stage: str) -> dict[str, Any]:
    """Flatten the shared sections and the stage's own section into notebook parameters."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    parameters = {
        "model_name": params["model"]["name"],
        "device": params["model"].get("device", "cpu"),
        "dtype": params["model"].get("dtype", "float32"),
        "data_dir": params["data"].get("dir"),
        "seed": params["seed"],
    }
    parameters.update(params.get(stage) or {})
    return parameters


def run_stage(stage: str, params_path: str | Path = "params.yaml", root: str | Path = ".") -> Path:
    """Execute the stage's notebook and return the path of the executed copy."""
    import papermill

    root = Path(root).resolve()
    parameters = stage_parameters(load_params(root / params_path), stage)
    notebook = root / STAGES[stage]
    declared = papermill.inspect_notebook(str(notebook))
    unknown = sorted(set(parameters) - set(declared))
    if unknown:
        raise ValueError(
            f"params for stage {stage!r} have keys the notebook does not declare: {', '.join(unknown)}. "
            f"Valid keys: {', '.join(sorted(declared))}"
        )

    output = root / EXECUTED_DIR / notebook.name
    failed = output.with_suffix(".failed.ipynb")
    with atomic_path(output, ".ipynb") as temporary:
        try:
            papermill.execute_notebook(
                str(notebook), str(temporary), parameters=parameters, cwd=str(root), kernel_name="python3"
            )
        except papermill.PapermillExecutionError:
            # Keep the partly executed notebook for debugging; the previous good copy stays in place.
            os.replace(temporary, failed)
            logger.error("stage %s failed; the partly executed notebook is at %s", stage, failed)
            raise
    failed.unlink(missing_ok=True)
    logger.info("executed %s -> %s", notebook, output)
    return output


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=sorted(STAGES), help="pipeline stage to run")
    parser.add_argument("--params", default="params.yaml", help="params file relative to the repository root")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_stage(args.stage, args.params)


if __name__ == "__main__":
    main()
