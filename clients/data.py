"""Corpora that ship in packages, chat formatting, partitions and the held-out split.

Records are plain dicts ``{"category": str, "prompt": str, "response": str}``.

- ``chatterbot``: PyPI ``chatterbot-corpus`` English conversations; every consecutive utterance
  pair is one record, the YAML file is its category (21 categories: natural non-IID clients).
- ``fortunes``: Debian ``fortunes`` (``apt-get install fortunes``); each fortune is a response to
  "Tell me something about <category>.", the fortune file is its category.

Split order (all seeded): held-out evaluation split (stratified by category, never trained on)
→ a small server "root" split (for FLTrust-style trust references; kept apart from evaluation)
→ a "public" split (``public_size`` records; KD-FedLLM's public set, known to server and
clients, trained on by nobody privately) → the rest, plus generated training tasks
(``clients/tasks.py``), is partitioned over clients with a flwr-datasets partitioner. The
held-out task set (exact match) is generated apart from the training tasks.
A public set can also come from a file (:func:`load_public_file`); :func:`overlap` says how
many of its records are held-out records (the run refuses any).
"""

from __future__ import annotations

import glob
import os
from collections import defaultdict
from functools import lru_cache

import numpy as np

CORPORA = ("chatterbot", "fortunes")
PARTITIONERS = ("natural", "dirichlet", "iid")
FORTUNES_DIR = "/usr/share/games/fortunes"


class DataError(ValueError):
    """A corpus or partition request that cannot be satisfied; the message names the fix."""


# ----------------------------------------------------------------------------- corpora
def _chatterbot_records() -> list[dict]:
    try:
        import chatterbot_corpus
        import yaml
    except ImportError as exc:
        raise DataError(
            f"the chatterbot corpus is missing ({exc.name}); install it with `pip install chatterbot-corpus pyyaml`"
        ) from None
    folder = os.path.join(os.path.dirname(chatterbot_corpus.__file__), "data", "english")
    files = sorted(glob.glob(os.path.join(folder, "*.yml")))
    if not files:
        raise DataError(f"no English files in {folder}; reinstall with `pip install --force-reinstall chatterbot-corpus`")
    records = []
    for path in files:
        category = os.path.splitext(os.path.basename(path))[0]
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
        for conversation in doc.get("conversations", []):
            turns = [str(t).strip() for t in conversation if t is not None]
            for prompt, response in zip(turns, turns[1:]):
                if prompt and response:
                    records.append({"category": category, "prompt": prompt, "response": response})
    return records


def _fortunes_records(folder: str = FORTUNES_DIR) -> list[dict]:
    files = sorted(f for f in glob.glob(os.path.join(folder, "*")) if os.path.isfile(f) and not f.endswith(".dat") and not os.path.islink(f))
    if not files:
        raise DataError(f"the fortunes corpus is missing at {folder}; install it with `apt-get install fortunes`")
    records = []
    for path in files:
        category = os.path.basename(path)
        with open(path, encoding="utf-8", errors="replace") as fh:
            for text in fh.read().split("\n%\n"):
                text = text.strip().strip("%").strip()
                if 10 <= len(text) <= 600:
                    records.append({"category": category, "prompt": f"Tell me something about {category}.", "response": text})
    return records


@lru_cache(maxsize=4)
def _load_cached(name: str) -> tuple[dict, ...]:
    if name == "chatterbot":
        return tuple(_chatterbot_records())
    if name == "fortunes":
        return tuple(_fortunes_records())
    raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(CORPORA)}")


def load_corpus(name: str = "chatterbot") -> list[dict]:
    """All records of a corpus (a fresh list; the parsed corpus is cached per process)."""
    return [dict(r) for r in _load_cached(name)]


# ----------------------------------------------------------------------------- splits
def split_heldout(records: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Stratified split: ``fraction`` of every category (at least one record) is held out."""
    if not 0.0 < fraction < 1.0:
        raise DataError(f"heldout-fraction must be in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    by_cat: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        by_cat[r["category"]].append(i)
    held = set()
    for cat in sorted(by_cat):
        idx = by_cat[cat]
        if len(idx) < 2:
            continue
        k = max(1, int(round(fraction * len(idx))))
        held.update(rng.choice(idx, size=k, replace=False).tolist())
    train = [r for i, r in enumerate(records) if i not in held]
    heldout = [r for i, r in enumerate(records) if i in held]
    return train, heldout


def _natural_groups(categories: list[str], num_partitions: int) -> dict[str, int]:
    """Map categories to ``num_partitions`` groups, largest first onto the lightest group."""
    counts: dict[str, int] = defaultdict(int)
    for c in categories:
        counts[c] += 1
    if num_partitions > len(counts):
        raise DataError(
            f"natural partitioning has only {len(counts)} categories for {num_partitions} clients; "
            "use partitioner=dirichlet or partitioner=iid, or fewer clients"
        )
    load = [0] * num_partitions
    group = {}
    for cat in sorted(counts, key=lambda c: (-counts[c], c)):
        g = int(np.argmin(load))
        group[cat] = g
        load[g] += counts[cat]
    return group


def partition(records: list[dict], num_partitions: int, scheme: str = "natural", seed: int = 42, alpha: float = 0.5) -> list[list[dict]]:
    """Split records over clients with a flwr-datasets partitioner (natural / dirichlet / iid)."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, NaturalIdPartitioner

    if num_partitions < 1:
        raise DataError("num-partitions must be >= 1")
    if num_partitions > len(records):
        raise DataError(f"{num_partitions} clients but only {len(records)} training records")
    columns = {k: [r[k] for r in records] for k in ("category", "prompt", "response")}
    if scheme == "natural":
        groups = _natural_groups(columns["category"], num_partitions)
        columns["group"] = [groups[c] for c in columns["category"]]
        partitioner = NaturalIdPartitioner(partition_by="group")
    elif scheme == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions, partition_by="category", alpha=alpha, min_partition_size=1, self_balancing=True, seed=seed
        )
    elif scheme == "iid":
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        raise DataError(f"unknown partitioner {scheme!r}; choose one of {', '.join(PARTITIONERS)}")
    dataset = Dataset.from_dict(columns)
    if scheme == "iid":
        dataset = dataset.shuffle(seed=seed)
    partitioner.dataset = dataset
    parts = []
    for pid in range(num_partitions):
        p = partitioner.load_partition(pid) if scheme != "natural" else partitioner.load_partition(_natural_index(partitioner, pid))
        parts.append([{"category": c, "prompt": q, "response": a} for c, q, a in zip(p["category"], p["prompt"], p["response"])])
    return parts


def _natural_index(partitioner, group: int) -> int:
    """NaturalIdPartitioner numbers partitions by first appearance; find the one holding ``group``."""
    _ = partitioner.num_partitions  # builds the id mapping lazily
    mapping = partitioner.partition_id_to_natural_id
    for pid, natural in mapping.items():
        if int(natural) == group:
            return pid
    raise DataError(f"no partition for group {group}")


def federated_splits(dataset: str, num_partitions: int, scheme: str, seed: int, heldout_fraction: float = 0.1,
                     alpha: float = 0.5, root_fraction: float = 0.03, public_size: int = 0, public_file: str = "",
                     task_eval_size: int = 0, task_train_size: int = 0) -> dict:
    """Everything a run needs (deterministic for a seed): ``{"partitions", "heldout", "root",
    "public", "tasks"}`` (``tasks``: the held-out task set for exact match)."""
    from .tasks import task_split

    records = load_corpus(dataset)
    train, heldout = split_heldout(records, heldout_fraction, seed)
    train, root = split_heldout(train, root_fraction, seed + 1) if root_fraction > 0 else (train, [])
    if public_file:
        public = load_public_file(public_file)
    else:
        train, public = split_public(train, public_size, seed + 2, exclude=heldout)
    tasks, task_train = task_split(task_eval_size, task_train_size, seed + 3)
    return {"partitions": partition(train + task_train, num_partitions, scheme, seed, alpha), "heldout": heldout,
            "root": root, "public": public, "tasks": tasks}


def split_public(records: list[dict], size: int, seed: int, exclude: list[dict] = ()
                 ) -> tuple[list[dict], list[dict]]:
    """(the rest, ``size`` records drawn with the seed): the public set, taken before partitioning.

    The corpus repeats some (prompt, response) pairs; only pairs that occur once in ``records``
    and never in ``exclude`` (the held-out split) are drawn, so no client holds a public record
    privately and no public record is evaluation data."""
    if size <= 0:
        return records, []
    counts: dict[tuple, int] = defaultdict(int)
    for r in records:
        counts[_pair(r)] += 1
    banned = {_pair(r) for r in exclude}
    candidates = [i for i, r in enumerate(records) if counts[_pair(r)] == 1 and _pair(r) not in banned]
    if size >= len(candidates):
        raise DataError(f"kd-public-size={size} leaves no private training data ({len(candidates)} records could "
                        "be public); lower kd-public-size")
    chosen = set(np.random.default_rng(seed).choice(candidates, size=size, replace=False).tolist())
    return [r for i, r in enumerate(records) if i not in chosen], [r for i, r in enumerate(records) if i in chosen]


def _pair(record: dict) -> tuple[str, str]:
    return record["prompt"].strip(), record["response"].strip()


def load_public_file(path: str) -> list[dict]:
    """A public set from a JSON list or JSON-lines file of ``{"prompt", "response"}`` records."""
    import json

    try:
        with open(os.path.expanduser(path), encoding="utf-8") as fh:
            text = fh.read()
        rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(l) for l in text.splitlines() if l.strip()]
    except (OSError, ValueError) as exc:
        raise DataError(f"kd-public={path!r} cannot be read as JSON / JSON lines ({exc})") from None
    out = []
    for i, r in enumerate(rows):
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("response"), str):
            raise DataError(f"kd-public={path!r}: record {i} is not {{\"prompt\": str, \"response\": str}}")
        out.append({"category": str(r.get("category", "public")), "prompt": r["prompt"], "response": r["response"]})
    if not out:
        raise DataError(f"kd-public={path!r} holds no records")
    return out


def overlap(records: list[dict], others: list[dict]) -> int:
    """How many of ``records`` are (prompt, response) pairs of ``others``."""
    pairs = {_pair(r) for r in others}
    return sum(_pair(r) in pairs for r in records)


# ----------------------------------------------------------------------------- formatting
def chat_messages(record: dict) -> list[dict]:
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def tokenize(records: list[dict], tokenizer, max_length: int, keep_all: bool = False) -> list[dict]:
    """Chat-format and tokenize; ``labels`` mask the prompt (-100) so loss is on the answer only.
    Records whose answer is cut off entirely are dropped, unless ``keep_all`` (then they keep
    no answer token: the public set, whose ids must index the same records everywhere)."""
    out = []
    for r in records:
        messages = chat_messages(r)
        prompt_text = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(messages, tokenize=False)
        ids = tokenizer(full_text, add_special_tokens=False)["input_ids"][:max_length]
        n_prompt = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        labels = [-100] * min(n_prompt, len(ids)) + ids[n_prompt:]
        if keep_all or any(l != -100 for l in labels):
            out.append({"input_ids": ids, "labels": labels})
    return out


def collate(examples: list[dict], pad_id: int):
    """Right-pad a batch into tensors ``input_ids``, ``attention_mask``, ``labels``."""
    import torch

    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[i, :n] = torch.tensor(e["input_ids"])
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e["labels"])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
