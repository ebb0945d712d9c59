"""The command line on the embedded model: one JSON object per command, clear errors on bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spikelib import cli, models, zeroshot


def run_cli(capsys, arguments: list[str]) -> tuple[int, dict | None, str]:
    code = cli.main(arguments)
    captured = capsys.readouterr()
    payload = json.loads(captured.out) if captured.out.strip() else None
    return code, payload, captured.err


@pytest.mark.integration
def test_ppl_prints_one_json_object(capsys, data_dir):
    arguments = ["ppl", "--method", "w8a8+qfem+qfep", "--windows", "1", "--seq-len", "32", "--data-dir", str(data_dir),
                 "--calib-windows", "2", "--search-windows", "1", "--n-thresholds", "2", "--context-candidates", "4",
                 "--spike-candidates", "2", "--no-progress"]
    code, payload, _ = run_cli(capsys, arguments)
    assert code == 0
    assert payload["method"] == "w8a8+qfem+qfep"
    assert payload["n_tokens"] == 32
    assert payload["ppl"] > 1
    assert len(payload["prefix_ids"]) == 3
    assert payload["n_fp_modules"] == len(payload["fp_modules"])


@pytest.mark.integration
def test_calibrate_saves_scales(capsys, data_dir, tmp_path):
    output = tmp_path / "scales.pt"
    arguments = ["calibrate", "--windows", "1", "--seq-len", "32", "--data-dir", str(data_dir), "--output", str(output),
                 "--no-progress"]
    code, payload, _ = run_cli(capsys, arguments)
    assert code == 0
    assert output.is_file()
    assert payload["n_tokens"] == 32
    assert payload["top_sites"][0]["ratio"] >= payload["top_sites"][-1]["ratio"]


def test_negative_windows_rejected(capsys):
    code, payload, err = run_cli(capsys, ["ppl", "--windows", "-1"])
    assert code == 2
    assert payload is None
    assert "--windows must be at least 0" in err


def test_missing_data_dir_reported(capsys, tmp_path):
    missing = tmp_path / "absent"
    code, payload, err = run_cli(capsys, ["calibrate", "--data-dir", str(missing)])
    assert code == 1
    assert payload is None
    assert str(missing) in err
    assert "SPIKELIB_DATA_DIR" in err


def test_unknown_method_rejected():
    with pytest.raises(SystemExit):
        cli.main(["ppl", "--method", "w4a4"])


def test_unknown_granularity_rejected():
    with pytest.raises(SystemExit):
        cli.main(["ppl", "--method", "w8a8", "--act-granularity", "per-channel"])


@pytest.mark.integration
def test_ppl_smoothquant_static(capsys, data_dir):
    arguments = ["ppl", "--method", "w8a8+sq+qfep", "--act-granularity", "static", "--sq-alpha", "0.6",
                 "--quantize-attention", "--windows", "1", "--seq-len", "32", "--data-dir", str(data_dir),
                 "--calib-windows", "2", "--context-candidates", "4", "--spike-candidates", "2", "--no-progress"]
    code, payload, _ = run_cli(capsys, arguments)
    assert code == 0
    assert payload["act_granularity"] == "static"
    assert payload["sq_alpha"] == 0.6
    assert payload["quantized_attention"] is True
    assert len(payload["prefix_ids"]) == 3
    assert payload["n_tokens"] == 32
    assert payload["ppl"] > 1


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["ppl", "--seq-len", "1"], "--seq-len must be at least 2"),
        (["qfem", "--windows", "0"], "--windows must be at least 1"),
        (["ppl", "--calib-windows", "0", "--method", "w8a8+qfem"], "--calib-windows must be at least 1"),
        (["ppl", "--method", "w8a8", "--scales", "scales.pt"], "--scales is not used by --method w8a8"),
        (["qfep", "--scales", "/nonexistent/scales.pt"], "--scales file not found: /nonexistent/scales.pt"),
        (["ppl", "--method", "w8a8+sq", "--sq-alpha", "1.5"], "--sq-alpha must be from 0 to 1, got 1.5"),
        (["ppl", "--quantize-attention"], "--quantize-attention needs a quantized method"),
        (["ppl", "--method", "w8a8+sq", "--scales", "scales.pt"], "--scales is not used by --method w8a8+sq"),
    ],
)
def test_invalid_arguments_rejected_early(capsys, arguments, message):
    code, payload, err = run_cli(capsys, arguments)
    assert code == 2
    assert payload is None
    assert message in err


def _run_json(command: list[str], env: dict) -> dict:
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1200)
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stderr[-3000:]}"
    return result


@pytest.mark.integration
def test_zeroshot_matches_lm_eval_cli(data_dir, tmp_path):
    """On the FP32 model and the same documents, spikelib zeroshot and lm-eval's command line agree exactly."""
    tasks = ["piqa", "lambada_openai", "hellaswag", "winogrande"]
    folder = zeroshot.write_task_configs(data_dir, tmp_path / "tasks", tasks)
    gguf = models.zoo_gguf_path("smollm2-135m")
    # Both run as child processes with the same thread settings, so the float reductions are the same.
    env = dict(os.environ, OMP_NUM_THREADS="1", SPIKELIB_DATA_DIR=str(data_dir), HF_DATASETS_OFFLINE="1")
    binary = Path(sys.executable).parent

    ours = _run_json([str(binary / "spikelib"), "zeroshot", "--method", "fp", "--tasks", ",".join(tasks), "--limit", "6",
                      "--batch-size", "4", "--no-progress"], env)
    ours = json.loads(ours.stdout)["tasks"]
    output = tmp_path / "harness"
    _run_json([str(binary / "lm_eval"), "run", "--model", "hf", "--model_args",
               f"pretrained={gguf.parent},gguf_file={gguf.name},dtype=float32", "--tasks", *tasks, "--limit", "6",
               "--batch_size", "4", "--include_path", str(folder), "--output_path", str(output), "--device", "cpu"], env)
    harness = json.loads(next(output.rglob("results_*.json")).read_text())["results"]

    for task in tasks:
        for metric in ("acc", "acc_norm"):
            if f"{metric},none" in harness[task]:
                assert ours[task][metric] == harness[task][f"{metric},none"], f"{task} {metric}"
                assert ours[task][f"{metric}_stderr"] == pytest.approx(harness[task][f"{metric}_stderr,none"], rel=1e-12)
        assert ours[task]["n_docs"] == 6
    assert ours["lambada_openai"]["perplexity"] == pytest.approx(harness["lambada_openai"]["perplexity,none"], rel=1e-9)


def test_zeroshot_missing_task_file_reported_early(capsys, tmp_path, monkeypatch):
    def fail_load(*args, **kwargs):
        raise AssertionError("the model must not load before the mirror is checked")

    monkeypatch.setattr(models, "load_model", fail_load)
    (tmp_path / "piqa").mkdir()
    code, payload, err = run_cli(capsys, ["zeroshot", "--tasks", "piqa", "--limit", "1", "--data-dir", str(tmp_path)])
    assert code == 1
    assert payload is None
    assert "piqa/validation.jsonl not found" in err


def test_models_lists_zoo_and_families(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKELIB_CACHE", str(tmp_path))
    assert cli.main(["models"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [row["name"] for row in report["zoo"]] == ["smollm2-135m", "gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b"]
    assert [row["wheels"] for row in report["zoo"]] == [1, 4, 6, 22]
    assert not any(row["cached"] for row in report["zoo"])  # an empty cache, and nothing was downloaded
    assert list((tmp_path).iterdir()) == []
    families = {row["family"]: row for row in report["families"]}
    assert families["mixtral"]["router"] == "mlp.gate"
    assert families["gpt2"]["glu"] is False
    assert families["phi3"]["sites"]["qkv_proj"] == ["self_attn.qkv_proj"]


@pytest.mark.integration
def test_bench_prints_each_method(capsys, data_dir):
    code = cli.main(["bench", "--model", "smollm2-135m", "--data-dir", str(data_dir), "--seq-len", "32", "--repeats", "2",
                     "--methods", "fp,w8a8,w8a8+qfem+qfep", "--calib-windows", "1", "--search-windows", "1",
                     "--n-thresholds", "2", "--spike-candidates", "2", "--context-candidates", "2", "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["methods"]) == ["fp", "w8a8", "w8a8+qfem+qfep"]
    for result in report["methods"].values():
        assert result["prefill_ms"] > 0
        assert len(result["runs_ms"]) == 2
    fp, w8a8 = report["methods"]["fp"], report["methods"]["w8a8"]
    assert w8a8["linear_weight_mb"] < fp["linear_weight_mb"] / 3.5  # int8 weights and per-channel scales
    assert w8a8["model_mb"] < fp["model_mb"]
    assert w8a8["peak_memory_mb"] >= w8a8["model_mb"]
    assert len(report["prefix_ids"]) == 3


@pytest.mark.integration
def test_bench_saves_a_plan_and_reuses_it(capsys, tmp_path, data_dir):
    saved = tmp_path / "plan.json"
    code = cli.main(["bench", "--model", "smollm2-135m", "--data-dir", str(data_dir), "--seq-len", "16", "--repeats", "1",
                     "--methods", "w8a8+qfem+qfep", "--calib-windows", "1", "--search-windows", "1", "--n-thresholds", "2",
                     "--spike-candidates", "2", "--context-candidates", "2", "--save-plan", str(saved), "--no-progress"])
    assert code == 0
    first = json.loads(capsys.readouterr().out)
    payload = json.loads(saved.read_text())
    assert payload["method"] == "w8a8+qfem+qfep"
    assert payload["full_precision_modules"] == sorted(first["fp_modules"])
    assert payload["prefix_ids"] == first["prefix_ids"]
    assert payload["input_absmax"]["model.layers.11.mlp.down_proj"] > 500  # the spike site's calibrated maximum
    code = cli.main(["bench", "--model", "smollm2-135m", "--seq-len", "16", "--repeats", "1",
                     "--methods", "w8a8+qfep,torchao+qfem+qfep", "--plan", str(saved), "--no-progress"])
    assert code == 0
    second = json.loads(capsys.readouterr().out)
    assert second["plan"] == str(saved)
    assert second["methods"]["torchao+qfem+qfep"]["prefix_tokens"] == len(first["prefix_ids"])
    assert second["methods"]["torchao+qfem+qfep"]["fp_modules"] == len(first["fp_modules"])
    assert second["methods"]["torchao+qfem+qfep"]["activation"] == "int8 dynamic, per-token"


def test_bench_rejects_unknown_method():
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["bench", "--methods", "fp,int4"])


def test_bench_save_plan_folder_reported(capsys, tmp_path):
    assert cli.main(["bench", "--save-plan", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


@pytest.mark.integration
def test_bench_plan_for_another_model_rejected(capsys, tmp_path):
    from spikelib.plan import QuantizationPlan

    path = QuantizationPlan("qwen2.5-0.5b", "w8a8+qfep", prefix_ids=[151643, 646, 374]).save(tmp_path / "qwen.json")
    code = cli.main(["bench", "--model", "smollm2-135m", "--plan", str(path), "--methods", "w8a8+qfep", "--no-progress"])
    assert code == 1
    assert "is a plan for qwen2.5-0.5b, not smollm2-135m" in capsys.readouterr().err


def test_bench_missing_plan_reported(capsys, tmp_path):
    assert cli.main(["bench", "--plan", str(tmp_path / "missing.json")]) == 2
    assert "--plan file not found" in capsys.readouterr().err
