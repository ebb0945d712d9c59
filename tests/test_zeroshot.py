"""Zero-shot evaluation through lm-evaluation-harness: tiny models, QFeP requests and task sources."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from conftest import BOS_ID
from spikelib import qfep, zeroshot

DOCS = [
    {"context": "w10 w11 w12", "choices": ["w20", "w30"], "label": 0},
    {"context": "w40 w41", "choices": ["w50", "w60", "w70"], "label": 2},
]


@pytest.fixture
def choice_task(tmp_path) -> TaskManager:
    """A two-document multiple-choice task on the tiny tokenizer's words."""
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in DOCS))
    config = {
        "task": "tiny_choice",
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": str(data)}},
        "output_type": "multiple_choice",
        "validation_split": "validation",
        "doc_to_text": "{{context}}",
        "doc_to_target": "label",
        "doc_to_choice": "{{choices}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 3.0},
    }
    (tmp_path / "tiny_choice.yaml").write_text(yaml.safe_dump(config))
    return TaskManager(include_path=str(tmp_path))


def word_ids(text: str) -> list[int]:
    return [int(word[1:]) for word in text.split()]


def expected_loglikelihood(model, context: list[int], continuation: list[int]) -> float:
    tokens = torch.tensor([context + continuation])
    logits = model(input_ids=tokens).logits[0].log_softmax(-1)
    positions = range(len(context) - 1, len(context) + len(continuation) - 1)
    return float(sum(logits[position, token] for position, token in zip(positions, continuation)))


def test_harness_accuracy_matches_hand_scoring(tiny_model, tiny_tokenizer, choice_task):
    result = zeroshot.evaluate_zeroshot(tiny_model, tiny_tokenizer, ["tiny_choice"], manager=choice_task, batch_size=4)
    correct = 0
    for doc in DOCS:
        scores = [expected_loglikelihood(tiny_model, word_ids(doc["context"]), word_ids(choice)) for choice in doc["choices"]]
        correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["label"])
    assert result.tasks["tiny_choice"]["acc"] == correct / len(DOCS)
    assert result.tasks["tiny_choice"]["version"] == 3.0
    assert result.tasks["tiny_choice"]["n_docs"] == 2
    assert result.paper_average_acc is None


def test_loglikelihoods_match_hand_scoring(tiny_model, tiny_tokenizer):
    lm = zeroshot.SpikelibLM(tiny_model, tiny_tokenizer, batch_size=2)
    requests = [Instance("loglikelihood", {}, ("w10 w11 w12", " w20 w21"), 0),
                Instance("loglikelihood", {}, ("w40", " w50"), 0)]
    scores = [score for score, _ in lm.loglikelihood(requests)]
    assert scores[0] == pytest.approx(expected_loglikelihood(tiny_model, [10, 11, 12], [20, 21]), abs=1e-4)
    assert scores[1] == pytest.approx(expected_loglikelihood(tiny_model, [40], [50]), abs=1e-4)


def test_prefix_scores_only_continuation(tiny_model, tiny_tokenizer):
    prefix_ids = [BOS_ID, 9, 17]
    prefix = qfep.PrefixCache(tiny_model, prefix_ids)
    lm = zeroshot.SpikelibLM(tiny_model, tiny_tokenizer, prefix=prefix, start_token_id=BOS_ID, batch_size=4)
    requests = [Instance("loglikelihood", {}, ("w10 w11 w12", " w20 w21"), 0),
                Instance("loglikelihood", {}, ("<s> w40", " w50"), 0),
                Instance("loglikelihood", {}, ("w7", " w8"), 0)]
    scores = [score for score, _ in lm.loglikelihood(requests)]

    # No start token: the prefix goes in front. A leading start token is replaced by the prefix.
    assert scores[0] == pytest.approx(expected_loglikelihood(tiny_model, prefix_ids + [10, 11, 12], [20, 21]), abs=1e-4)
    assert scores[1] == pytest.approx(expected_loglikelihood(tiny_model, prefix_ids + [40], [50]), abs=1e-4)
    assert scores[2] == pytest.approx(expected_loglikelihood(tiny_model, prefix_ids + [7], [8]), abs=1e-4)
    assert scores[0] != pytest.approx(expected_loglikelihood(tiny_model, [10, 11, 12], [20, 21]), abs=1e-4)
    assert prefix.cache.get_seq_length() == len(prefix_ids)


def test_prefixed_logits_mixed_rows(tiny_model):
    prefix_ids = [BOS_ID, 9, 17]
    prefix = qfep.PrefixCache(tiny_model, prefix_ids)
    inputs = torch.tensor([[BOS_ID, 20, 21, 22], [30, 31, 32, 33]])
    logits = zeroshot.prefixed_logits(tiny_model, prefix, inputs, BOS_ID)
    full_first = tiny_model(input_ids=torch.tensor([prefix_ids + [20, 21, 22]])).logits[0]
    full_second = tiny_model(input_ids=torch.tensor([prefix_ids + [30, 31, 32, 33]])).logits[0]
    assert logits.shape == (2, 4, 128)
    torch.testing.assert_close(logits[0], full_first[2:], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[1], full_second[3:], rtol=1e-4, atol=1e-4)


def test_articles_rebuild_text(data_dir):
    text = (data_dir / "wikitext-2-raw-v1" / "test.txt").read_text(encoding="utf-8")
    articles = zeroshot.split_articles(text)
    assert "\n".join(articles) == text
    assert len(articles) == 62
    assert articles[1].startswith(" = Du Fu = ")
    assert all(article.lstrip().startswith("= ") for article in articles)


def test_articles_keep_sections():
    text = " = A = \n x \n = = Part = = \n y \n = B = \n z \n"
    assert zeroshot.split_articles(text) == [" = A = \n x \n = = Part = = \n y ", " = B = \n z \n"]


def test_mirror_tasks_resolve(data_dir, tmp_path):
    tasks = ["piqa", "winogrande", "arc_challenge", "boolq", "lambada_openai", "wikitext"]
    folder = zeroshot.write_task_configs(data_dir, tmp_path, tasks)
    built = TaskManager(include_path=str(folder)).load(tasks)["tasks"]
    sizes = {name: len(task.eval_docs) for name, task in built.items()}
    assert sizes == {"piqa": 1838, "winogrande": 1267, "arc_challenge": 1172, "boolq": 3270,
                     "lambada_openai": 5153, "wikitext": 62}
    piqa = built["piqa"]
    assert piqa.config.dataset_path == "json"
    assert piqa.config.metadata["version"] == 1.0


def test_missing_mirror_file_reported(tmp_path):
    (tmp_path / "piqa").mkdir()
    with pytest.raises(FileNotFoundError, match="piqa/validation.jsonl"):
        zeroshot.write_task_configs(tmp_path, tmp_path / "tasks", ["piqa"])


@pytest.mark.parametrize("task", list(zeroshot.SOURCES))
def test_hub_task_names(task):
    source = zeroshot.SOURCES[task]
    config = load_yaml(zeroshot.harness_task_dir() / source.config, resolve_func=False)
    assert (config["dataset_path"], config.get("dataset_name")) == source.hub_dataset
    assert config["task"] == task
    split_key = "validation_split" if source.split == "validation" else "test_split"
    assert config[split_key] == source.split


def test_hub_manager_without_mirror(monkeypatch):
    monkeypatch.delenv("SPIKELIB_DATA_DIR", raising=False)
    with zeroshot.task_manager(None, ["piqa"]) as manager:
        assert manager.include_path is None


def test_unknown_task_rejected():
    with pytest.raises(ValueError, match="unknown task 'mmlu'"):
        with zeroshot.task_manager(None, ["mmlu"]):
            pass


def test_seeded_samples_are_stable():
    first = zeroshot.seeded_samples({"piqa": 100, "boolq": 5}, 10, seed=0)
    assert first == zeroshot.seeded_samples({"piqa": 100, "boolq": 5}, 10, seed=0)
    assert first["boolq"] == [0, 1, 2, 3, 4]
    assert len(first["piqa"]) == 10
    assert first["piqa"] == sorted(first["piqa"])
    assert first["piqa"] != zeroshot.seeded_samples({"piqa": 100}, 10, seed=1)["piqa"]


def test_seeded_samples_per_task_counts():
    samples = zeroshot.seeded_samples({"piqa": 100, "wikitext": 62}, {"piqa": 5, "wikitext": 0}, seed=0)
    assert len(samples["piqa"]) == 5
    assert samples["wikitext"] == list(range(62))
    alone = zeroshot.seeded_samples({"piqa": 100}, 5, seed=0)
    assert alone["piqa"] == samples["piqa"]


def test_rolling_perplexity_counts_tokens(tiny_model, tiny_tokenizer, data_dir):
    result = zeroshot.evaluate_zeroshot(tiny_model, tiny_tokenizer, ["wikitext"], data_dir, n_docs={"wikitext": 1},
                                        batch_size=8, max_length=64)
    metrics = result.tasks["wikitext"]
    assert metrics["n_docs"] == 1
    assert metrics["n_docs_total"] == 62
    assert metrics["n_tokens"] > 64
    assert 1 < metrics["token_perplexity"] < float("inf")
    assert result.rolling_documents == 1
    assert result.loglikelihood_requests == 0
