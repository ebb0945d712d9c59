"""Calibration window sampling and the WikiText-2 and C4 loaders on the local mirror."""

from __future__ import annotations

import sys

import pytest
import torch

from spikelib import data
from spikelib.calibration import sample_windows
from spikelib.data import DataUnavailableError, c4_documents, resolve_data_dir, wikitext2_test_rows, wikitext2_test_text

from conftest import BOS_ID

# Each document uses its own range of token ids, so a window identifies its document.
DOCUMENTS = [
    " ".join(f"w{token_id}" for token_id in range(10, 40)),
    " ".join(f"w{token_id}" for token_id in range(40, 60)),
    " ".join(f"w{token_id}" for token_id in range(60, 64)),
]
DOCUMENT_IDS = [list(range(10, 40)), list(range(40, 60)), list(range(60, 64))]


def windows_for(tokenizer, seed: int, n_windows: int = 6, seq_len: int = 8) -> torch.Tensor:
    return sample_windows(tokenizer, DOCUMENTS, n_windows, seq_len, BOS_ID, seed)


def is_contiguous_in(body: list[int], document: list[int]) -> bool:
    return any(document[start : start + len(body)] == body for start in range(len(document) - len(body) + 1))


def test_tokenizer_maps_words_to_ids(tiny_tokenizer):
    assert tiny_tokenizer(DOCUMENTS[2], add_special_tokens=False)["input_ids"] == DOCUMENT_IDS[2]


def test_sample_windows_shape(tiny_tokenizer):
    windows = windows_for(tiny_tokenizer, seed=0)
    assert windows.shape == (6, 8)
    assert windows.dtype == torch.long


def test_sample_windows_same_seed(tiny_tokenizer):
    assert torch.equal(windows_for(tiny_tokenizer, seed=3), windows_for(tiny_tokenizer, seed=3))


def test_sample_windows_different_seed(tiny_tokenizer):
    assert not torch.equal(windows_for(tiny_tokenizer, seed=3), windows_for(tiny_tokenizer, seed=4))


def test_sample_windows_start_token(tiny_tokenizer):
    windows = windows_for(tiny_tokenizer, seed=0)
    assert torch.equal(windows[:, 0], torch.full((6,), BOS_ID))


def test_sample_windows_contiguous(tiny_tokenizer):
    windows = windows_for(tiny_tokenizer, seed=0, n_windows=20)
    for row in windows.tolist():
        body = row[1:]
        assert any(is_contiguous_in(body, document) for document in DOCUMENT_IDS), row


def test_sample_windows_skips_short_documents(tiny_tokenizer):
    windows = windows_for(tiny_tokenizer, seed=0, n_windows=50)
    # The third document has 4 tokens, fewer than the 7 a window body needs.
    assert not bool(torch.isin(windows[:, 1:], torch.tensor(DOCUMENT_IDS[2])).any())


def test_sample_windows_uses_whole_range(tiny_tokenizer):
    # With a body of 20 tokens, the second document (20 tokens) fits exactly once.
    windows = sample_windows(tiny_tokenizer, DOCUMENTS[1:2], 3, 21, BOS_ID, seed=0)
    for row in windows.tolist():
        assert row[1:] == DOCUMENT_IDS[1]


def test_sample_windows_too_short(tiny_tokenizer):
    with pytest.raises(ValueError, match="seq_len=41") as raised:
        sample_windows(tiny_tokenizer, DOCUMENTS, 2, 41, BOS_ID, seed=0)
    message = str(raised.value)
    assert "the longest has 30" in message
    assert "Lower seq_len" in message


def test_sample_windows_no_documents(tiny_tokenizer):
    with pytest.raises(ValueError, match="the longest has 0"):
        sample_windows(tiny_tokenizer, [], 2, 8, BOS_ID, seed=0)


@pytest.mark.parametrize(("n_windows", "seq_len"), [(0, 8), (2, 1)])
def test_sample_windows_rejects_sizes(tiny_tokenizer, n_windows, seq_len):
    with pytest.raises(ValueError, match="n_windows >= 1 and seq_len >= 2"):
        sample_windows(tiny_tokenizer, DOCUMENTS, n_windows, seq_len, BOS_ID, seed=0)


# --- data mirror --------------------------------------------------------------------------


def test_wikitext_rows_count(data_dir):
    assert len(wikitext2_test_rows(data_dir)) == 4358


def test_wikitext_blank_rows(data_dir):
    rows = wikitext2_test_rows(data_dir)
    raw_lines = (data_dir / "wikitext-2-raw-v1" / "test.txt").read_bytes().decode("utf-8").split("\n")
    blank_lines = sum(1 for line in raw_lines if line == " ")
    assert blank_lines > 0
    assert rows.count("") == blank_lines
    assert " \n" not in rows


def test_wikitext_rows_keep_newline(data_dir):
    rows = wikitext2_test_rows(data_dir)
    raw = (data_dir / "wikitext-2-raw-v1" / "test.txt").read_bytes().decode("utf-8")
    assert all(row.endswith("\n") for row in rows if row)
    # Restoring the blank lines gives back the raw file byte for byte.
    assert "".join(row or " \n" for row in rows) == raw


def test_wikitext_text_joined(data_dir):
    rows = wikitext2_test_rows(data_dir)
    text = wikitext2_test_text(data_dir)
    assert text == "\n\n".join(rows)
    assert text.startswith(rows[0] + "\n\n" + rows[1])


def test_wikitext_env_variable(data_dir, monkeypatch):
    monkeypatch.setenv("SPIKELIB_DATA_DIR", str(data_dir))
    assert len(wikitext2_test_rows()) == 4358


def test_c4_train_documents(data_dir):
    documents = c4_documents("train", data_dir)
    assert len(documents) == 1000
    assert all(isinstance(document, str) and document for document in documents)


def test_c4_validation_documents(data_dir):
    assert len(c4_documents("validation", data_dir)) == 1025


def test_c4_rejects_split(tmp_path):
    with pytest.raises(ValueError, match="'test'") as raised:
        c4_documents("test", tmp_path)
    assert "train, validation" in str(raised.value)


def test_missing_mirror_names_folder(tmp_path):
    missing = tmp_path / "no-such-mirror"
    with pytest.raises(DataUnavailableError, match="no-such-mirror"):
        wikitext2_test_rows(missing)


def test_missing_mirror_from_env(tmp_path, monkeypatch):
    missing = tmp_path / "env-mirror"
    monkeypatch.setenv("SPIKELIB_DATA_DIR", str(missing))
    with pytest.raises(DataUnavailableError, match="env-mirror"):
        c4_documents("train")


def test_incomplete_mirror_names_file(tmp_path):
    with pytest.raises(DataUnavailableError, match="c4/validation.jsonl"):
        c4_documents("validation", tmp_path)


def test_resolve_data_dir_unset(monkeypatch):
    monkeypatch.delenv("SPIKELIB_DATA_DIR", raising=False)
    assert resolve_data_dir() is None


def test_resolve_data_dir_argument_first(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKELIB_DATA_DIR", str(tmp_path / "missing"))
    assert resolve_data_dir(tmp_path) == tmp_path


def test_mirror_reads_local_files(tmp_path):
    (tmp_path / "wikitext-2-raw-v1").mkdir()
    (tmp_path / "wikitext-2-raw-v1" / "test.txt").write_text(" \n = Title = \n \n Body text .\n", encoding="utf-8")
    (tmp_path / "c4").mkdir()
    (tmp_path / "c4" / "train_sample.jsonl").write_text('{"text": "first"}\n\n{"text": "second"}\n', encoding="utf-8")

    assert wikitext2_test_rows(tmp_path) == ["", " = Title = \n", "", " Body text .\n"]
    assert wikitext2_test_text(tmp_path) == "\n\n = Title = \n\n\n\n\n Body text .\n"
    assert c4_documents("train", tmp_path) == ["first", "second"]


def test_hub_failure_raises_unavailable(monkeypatch):
    monkeypatch.delenv("SPIKELIB_DATA_DIR", raising=False)

    def fail(path, **kwargs):
        raise ConnectionError("no network")

    fake_datasets = type("FakeDatasets", (), {"load_dataset": staticmethod(fail)})
    monkeypatch.setitem(sys.modules, "datasets", fake_datasets)
    with pytest.raises(DataUnavailableError, match="SPIKELIB_DATA_DIR"):
        data.wikitext2_test_rows()
