"""Zero-shot accuracy and rolling perplexity with lm-evaluation-harness, on in-memory configurations.

The harness scores every request with its own code (``lm_eval.models.huggingface.HFLM``); spikelib
only hands it the already transformed model. ``SpikelibLM`` changes one thing, for QFeP: the prefix
cache goes in front of every forward pass. A request that starts with the start token gets the
prefix in place of that token, and the logits at that position are the full-precision logits at
the prefix's last position. Any other request gets the prefix in front of its first token. The
prefix tokens themselves are never scored, and every batch gets its own copy of the cache.

Task data: with a local mirror, task configs are written to a folder. Each includes the
harness's own task file and replaces only the data source with the ``json`` builder on the
mirror's file, so prompts, metrics and versions are the harness's. Without a mirror the harness's built-in tasks load
their Hugging Face data sets.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn as nn
import yaml
from lm_eval import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager

from .data import resolve_data_dir
from .qfep import PrefixCache

logger = logging.getLogger(__name__)

PAPER_TASKS = ("piqa", "lambada_openai", "hellaswag", "winogrande")
TASKS = PAPER_TASKS + ("arc_easy", "arc_challenge", "boolq")
ROLLING_TASK = "wikitext"


@dataclass(frozen=True)
class TaskSource:
    """Source of a task's evaluation split: the harness's config, the mirror's file and the hub data set."""

    config: str  # task YAML inside lm_eval/tasks
    split: str  # "validation" or "test", the split the harness evaluates
    mirror_file: str  # file inside the data mirror
    hub_dataset: tuple[str, str | None]  # Hugging Face (path, name) the built-in task loads


SOURCES = {
    "piqa": TaskSource("piqa/piqa.yaml", "validation", "piqa/validation.jsonl", ("baber/piqa", None)),
    "lambada_openai": TaskSource("lambada/lambada_openai.yaml", "test", "lambada_openai/test.jsonl",
                                 ("EleutherAI/lambada_openai", "default")),
    "hellaswag": TaskSource("hellaswag/hellaswag.yaml", "validation", "hellaswag/validation.jsonl", ("Rowan/hellaswag", None)),
    "winogrande": TaskSource("winogrande/default.yaml", "validation", "winogrande/winogrande_xl_validation.jsonl",
                             ("allenai/winogrande", "winogrande_xl")),
    "arc_easy": TaskSource("arc/arc_easy.yaml", "test", "arc_easy/test.jsonl", ("allenai/ai2_arc", "ARC-Easy")),
    "arc_challenge": TaskSource("arc/arc_challenge.yaml", "test", "arc_challenge/test.jsonl",
                                ("allenai/ai2_arc", "ARC-Challenge")),
    "boolq": TaskSource("super_glue/boolq/default.yaml", "validation", "boolq/validation.jsonl", ("aps/super_glue", "boolq")),
    ROLLING_TASK: TaskSource("wikitext/wikitext.yaml", "test", "wikitext-2-raw-v1/test.txt",
                             ("EleutherAI/wikitext_document_level", "wikitext-2-raw-v1")),
}
ARTICLES_FILE = "wikitext_test_articles.jsonl"


def harness_task_dir() -> Path:
    """Return the folder of lm-evaluation-harness's built-in task configs."""
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def split_articles(text: str) -> list[str]:
    """Split raw WikiText into articles, each starting at its level-1 heading line `` = Title = ``.

    Lines are kept as they are and joined with ``"\\n"``, so joining the articles with ``"\\n"``
    gives back the text. Lower-level headings (`` = = Section = = ``) stay inside their article.
    """
    articles: list[list[str]] = []
    current: list[str] = []
    for line in text.split("\n"):
        stripped = line.strip()
        is_title = stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= =")
        if is_title and "\n".join(current).strip():
            articles.append(current)
            current = []
        current.append(line)
    articles.append(current)
    return ["\n".join(lines) for lines in articles]


def write_task_configs(data_dir: str | Path, folder: str | Path, tasks: Sequence[str] = TASKS + (ROLLING_TASK,)) -> Path:
    """Write task configs that read the local mirror into ``folder`` and return it.

    Pass the folder to ``lm_eval.tasks.TaskManager(include_path=...)`` or to the harness's
    ``--include_path``; its tasks take the built-in names and override the built-in tasks.
    """
    mirror = resolve_data_dir(data_dir)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        source = _source(task)
        data_file = mirror / source.mirror_file
        if not data_file.is_file():
            raise FileNotFoundError(f"{data_file} not found; the data mirror needs {source.mirror_file} for task {task}")
        if task == ROLLING_TASK:
            articles = split_articles(data_file.read_text(encoding="utf-8"))
            data_file = folder / ARTICLES_FILE
            data_file.write_text("".join(json.dumps({"page": page}) + "\n" for page in articles), encoding="utf-8")
        config = {
            "include": str(harness_task_dir() / source.config),
            "task": task,
            "dataset_path": "json",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {source.split: str(data_file.resolve())}},
            "training_split": None,
            "validation_split": source.split if source.split == "validation" else None,
            "test_split": source.split if source.split == "test" else None,
            "fewshot_split": None,
        }
        (folder / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return folder


def _source(task: str) -> TaskSource:
    if task not in SOURCES:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(SOURCES)}")
    return SOURCES[task]


@contextlib.contextmanager
def task_manager(data_dir: str | Path | None, tasks: Sequence[str]) -> Iterator:
    """Yield a ``TaskManager`` whose ``tasks`` read the mirror (when one is configured) or the hub."""
    for task in tasks:
        _source(task)
    mirror = resolve_data_dir(data_dir)
    if mirror is None:
        yield TaskManager()
        return
    with tempfile.TemporaryDirectory(prefix="spikelib-tasks-") as folder:
        write_task_configs(mirror, folder, tasks)
        # The harness warns about every task that the folder overrides; that override is the point.
        harness_logger = logging.getLogger("lm_eval")
        level = harness_logger.level
        harness_logger.setLevel(logging.ERROR)
        try:
            manager = TaskManager(include_path=folder)
        finally:
            harness_logger.setLevel(level)
        yield manager


class SpikelibLM(HFLM):
    """The harness's HFLM on an in-memory model, with an optional QFeP prefix (see the module docstring).

    It also counts the tokens and the summed log-likelihood of rolling (perplexity) requests, for
    token-level perplexity beside the harness's word and byte perplexities.
    """

    def __init__(self, model: nn.Module, tokenizer, prefix: PrefixCache | None = None, start_token_id: int | None = None,
                 batch_size: int = 8, max_length: int | None = None):
        super().__init__(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
        self.prefix = prefix
        self.start_token_id = start_token_id
        self.rolling_tokens = 0
        self.rolling_loglikelihood = 0.0
        self.loglikelihood_requests = 0

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        self.loglikelihood_requests += len(requests)
        return super().loglikelihood(requests, disable_tqdm)

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        if self.prefix is None:
            return super()._model_call(inps, attn_mask, labels)
        return prefixed_logits(self.model, self.prefix, inps, self.start_token_id)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        results = super().loglikelihood_rolling(requests, disable_tqdm)
        for request, loglikelihood in zip(requests, results):
            self.rolling_tokens += len(self.tok_encode(request.args[0]))
            self.rolling_loglikelihood += float(loglikelihood)
        return results


@torch.no_grad()
def prefixed_logits(model: nn.Module, prefix: PrefixCache, input_ids: torch.Tensor, start_token_id: int | None) -> torch.Tensor:
    """Return logits ``(batch, seq, vocab)`` for ``input_ids`` run after the prefix cache.

    Rows that start with ``start_token_id`` drop it because the prefix replaces it, and their
    first logits are the prefix's last full-precision logits. Other rows run whole after the prefix.
    """
    batch, length = input_ids.shape
    starts = (input_ids[:, 0] == start_token_id) if start_token_id is not None else torch.zeros(batch, dtype=torch.bool)
    logits = None
    for replace in (True, False):
        rows = torch.nonzero(starts == replace).flatten()
        if rows.numel() == 0:
            continue
        body = input_ids[rows, 1:] if replace else input_ids[rows]
        parts = []
        if replace:
            parts.append(prefix.last_logits.to(input_ids.device)[:, None, :].expand(rows.numel(), 1, -1))
        if body.shape[1] > 0:
            cache = prefix.fresh()
            if rows.numel() > 1:
                cache.batch_repeat_interleave(rows.numel())
            output = model(input_ids=body, **{prefix.cache_keyword: cache, "use_cache": True})
            parts.append(output.logits.float())
        group = torch.cat(parts, dim=1)
        if logits is None:
            logits = group.new_empty(batch, length, group.shape[-1])
        logits[rows] = group
    return logits


@dataclass
class ZeroShotResult:
    """Per-task metrics of one configuration and the mean accuracy over ``PAPER_TASKS``."""

    tasks: dict[str, dict]
    paper_average_acc: float | None
    samples: dict[str, list[int] | None] = field(default_factory=dict)
    limit: int | None = None
    loglikelihood_requests: int = 0
    rolling_documents: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


def seeded_samples(task_sizes: dict[str, int], n_docs: int | dict[str, int], seed: int) -> dict[str, list[int]]:
    """Return, per task, ``n_docs`` document indices drawn without replacement with ``seed``.

    ``n_docs`` is one count for every task or a count per task. A count of 0, or one at least
    the task's size, takes every document. Each task draws from its own generator, seeded with
    ``seed`` and the task name, so adding a task leaves the others' documents unchanged.
    """
    samples = {}
    for task, size in task_sizes.items():
        count = n_docs.get(task, 0) if isinstance(n_docs, dict) else n_docs
        if count <= 0 or count >= size:
            samples[task] = list(range(size))
            continue
        generator = random.Random(f"{seed}:{task}")
        samples[task] = sorted(generator.sample(range(size), count))
    return samples


def task_sizes(manager, tasks: Sequence[str]) -> dict[str, int]:
    """Return the number of evaluation documents of each task."""
    loaded = manager.load(list(tasks))["tasks"]
    return {name: len(task.eval_docs) for name, task in loaded.items()}


def evaluate_zeroshot(
    model: nn.Module,
    tokenizer,
    tasks: Sequence[str] = TASKS,
    data_dir: str | Path | None = None,
    prefix: PrefixCache | None = None,
    start_token_id: int | None = None,
    limit: int | None = None,
    n_docs: int | dict[str, int] | None = None,
    seed: int = 0,
    batch_size: int = 8,
    max_length: int | None = None,
    bootstrap_iters: int = 1000,
    manager: TaskManager | None = None,
) -> ZeroShotResult:
    """Evaluate one configuration on ``tasks`` with lm-evaluation-harness and return its metrics.

    ``limit`` evaluates the first documents of each task, as the harness's ``--limit`` does.
    ``n_docs`` (one count, or a count per task) evaluates a seeded random subset, the same for
    every configuration with the same seed (see ``seeded_samples``). Without either, every
    document is evaluated. ``bootstrap_iters`` only affects the standard errors of
    perplexity-type metrics. ``manager`` replaces the task manager that ``data_dir`` selects, for
    tasks outside ``SOURCES``.
    """
    if limit is not None and n_docs is not None:
        raise ValueError("give at most one of limit and n_docs")
    tasks = list(dict.fromkeys(tasks))
    started = time.perf_counter()
    lm = SpikelibLM(model, tokenizer, prefix, start_token_id, batch_size, max_length)
    managed = contextlib.nullcontext(manager) if manager is not None else task_manager(data_dir, tasks)
    with managed as manager:
        samples = seeded_samples(task_sizes(manager, tasks), n_docs, seed) if n_docs is not None else None
        output = simple_evaluate(
            model=lm, tasks=tasks, task_manager=manager, limit=limit, samples=samples, log_samples=False,
            bootstrap_iters=bootstrap_iters, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        )
    metrics = {task: _task_metrics(output, task) for task in tasks}
    if ROLLING_TASK in metrics and lm.rolling_tokens:
        metrics[ROLLING_TASK]["token_perplexity"] = math.exp(-lm.rolling_loglikelihood / lm.rolling_tokens)
        metrics[ROLLING_TASK]["n_tokens"] = lm.rolling_tokens
    paper = [metrics[task]["acc"] for task in PAPER_TASKS if task in metrics]
    average = sum(paper) / len(paper) if len(paper) == len(PAPER_TASKS) else None
    rolling = metrics.get(ROLLING_TASK, {}).get("n_docs") or 0
    return ZeroShotResult(tasks=metrics, paper_average_acc=average, samples=samples or {}, limit=limit,
                          loglikelihood_requests=lm.loglikelihood_requests, rolling_documents=rolling,
                          seconds=time.perf_counter() - started)


def _task_metrics(output: dict, task: str) -> dict:
    values = output["results"][task]
    metrics: dict = {"version": output["versions"].get(task)}
    for key, value in values.items():
        if "," not in key:
            continue
        name, _, filter_name = key.partition(",")
        if filter_name == "none" and isinstance(value, (int, float)):
            metrics[name] = float(value)
    counts = output.get("n-samples", {}).get(task, {})
    metrics["n_docs"] = counts.get("effective")
    metrics["n_docs_total"] = counts.get("original")
    return metrics
