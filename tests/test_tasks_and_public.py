"""The task set with verifiable answers (generated offline, seeded), exact match on a model that learned
a task, and the public split KD-FedLLM uses (kept apart from the held-out split and from every
client's private data)."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from fedledger.clients import data as data_lib
from fedledger.clients import model as model_lib
from fedledger.clients import tasks as tasks_lib
from fedledger.clients import train as train_lib


def test_every_task_has_one_verifiable_answer():
    tasks = tasks_lib.all_tasks()
    assert len(tasks) == len({t["prompt"] for t in tasks}) == 258
    assert {t["category"] for t in tasks} == set(tasks_lib.KINDS)
    by_prompt = {t["prompt"]: t["response"] for t in tasks}
    assert by_prompt["What is 7 + 8?"] == "15" and by_prompt["What comes after Sunday?"] == "Monday"
    assert by_prompt["Write in capital letters: river"] == "RIVER" and by_prompt["Repeat twice: cloud"] == "cloud cloud"


def test_the_eval_and_train_tasks_are_disjoint_and_seeded():
    ev, tr = tasks_lib.task_split(24, 160, seed=3)
    assert len(ev) == 24 and len(tr) == 160 and not {t["prompt"] for t in ev} & {t["prompt"] for t in tr}
    assert tasks_lib.task_split(24, 160, seed=3) == (ev, tr)
    assert tasks_lib.task_split(24, 160, seed=4)[0] != ev
    with pytest.raises(ValueError, match="within 0..258"):
        tasks_lib.task_split(200, 100, seed=0)


def test_exact_match_is_one_once_the_model_has_learned_the_answers():
    net, tok = model_lib.load_model("tiny", seed=0, device="cpu")
    model = model_lib.add_lora(net, 16, 32, 0.0, ("q_proj", "k_proj", "v_proj", "o_proj"), seed=0)
    tasks = [t for t in tasks_lib.all_tasks() if t["category"] == "task-upper"][:2]
    assert train_lib.exact_match(model, tok, tasks) == 0.0
    examples = data_lib.tokenize(tasks, tok, 64)
    for p in model.parameters():  # the whole tiny model learns two answers by heart
        p.requires_grad_(True)
    train_lib.train_steps(model, examples, tok.pad_token_id, 150, 2, 5e-3, seed=0)
    assert train_lib.exact_match(model, tok, tasks) == 1.0
    wrong = [{**t, "response": t["response"].lower()} for t in tasks]
    assert train_lib.exact_match(model, tok, wrong) == 0.0


def test_top1_accuracy_counts_answer_tokens_whose_best_guess_is_right(tiny_task):
    import torch

    examples = tiny_task.examples("heldout")[:8]
    result = train_lib.evaluate(tiny_task.model, examples, tiny_task.pad_id, batch_size=4)
    batch = data_lib.collate(examples, tiny_task.pad_id)
    with torch.no_grad():
        logits = tiny_task.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    labels = batch["labels"][:, 1:]
    mask = labels != -100
    expected = float(((logits.argmax(-1) == labels) & mask).sum() / mask.sum())
    assert result["accuracy"] == pytest.approx(expected, abs=1e-9)


def test_the_public_split_is_apart_from_heldout_and_from_every_client():
    splits = data_lib.federated_splits("chatterbot", 4, "natural", seed=5, public_size=50, task_train_size=40,
                                       task_eval_size=8)
    pairs = lambda rs: {(r["prompt"], r["response"], r["category"]) for r in rs}  # noqa: E731
    public = pairs(splits["public"])
    assert len(splits["public"]) == 50 and not public & pairs(splits["heldout"])
    assert all(not public & pairs(p) for p in splits["partitions"])
    private = [r for p in splits["partitions"] for r in p]
    assert sum(r["category"].startswith("task-") for r in private) == 40
    assert not {r["prompt"] for r in splits["tasks"]} & {r["prompt"] for r in private}
    again = data_lib.federated_splits("chatterbot", 4, "natural", seed=5, public_size=50, task_train_size=40,
                                      task_eval_size=8)
    assert again["public"] == splits["public"]


def test_without_a_public_size_the_partitions_are_what_they_were():
    a = data_lib.federated_splits("chatterbot", 3, "natural", seed=1)
    assert a["public"] == [] and a["tasks"] == []
    assert sum(map(len, a["partitions"])) + len(a["heldout"]) + len(a["root"]) == len(data_lib.load_corpus())


def test_kd_with_the_whole_vocabulary_as_k_is_warned_about(caplog):
    from fedledger.core import Identity
    from fedledger.strategies import topology
    from fedledger.strategies.kd import KDRunner

    class Server:
        vocab_size, public_size = 50, 10

    class Ids:
        def refresh(self, grid):
            return None

        def resolve(self, node_id):
            return Identity(node_id)

    with caplog.at_level(logging.WARNING, logger="fedledger"):
        KDRunner(Server(), topology.build("complete", 2), identities=Ids(), k=50)
    assert "whole vocabulary" in caplog.text
    assert np.isfinite(KDRunner(Server(), topology.build("complete", 2), identities=Ids(), k=5).k)
