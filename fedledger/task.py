"""What a party needs for a run, built once per process and cached: the LoRA-wrapped model,
its tokenizer, and the tokenized data splits. Both apps use it; nothing is reloaded per round.
"""

from __future__ import annotations

import logging
import threading

from fedledger.clients import data as data_lib
from fedledger.clients import model as model_lib
from fedledger.clients import train as train_lib

from .config import Settings

log = logging.getLogger("fedledger")
_CACHE: dict[tuple, "Task"] = {}
_LOCK = threading.Lock()


class Task:
    """Model + tokenizer + splits for one (model, LoRA, data, partitions, seed) setting."""

    def __init__(self, settings: Settings, num_partitions: int):
        self.settings = settings
        self.num_partitions = num_partitions
        m, data, seed = settings.model, settings.data, settings.run.seed
        base, self.tokenizer = model_lib.load_model(m.name, m.cache_dir(), m.quantization, seed=seed)
        self.model = model_lib.add_lora(base, m.lora_r, m.lora_alpha, m.lora_dropout, m.lora_targets, seed=seed)
        model_lib.set_activation_checkpointing(self.model, m.activation_checkpointing)
        self.initial_adapter = model_lib.get_adapter(self.model)
        self.splits = data_lib.federated_splits(
            data.dataset, num_partitions, data.partitioner, seed,
            heldout_fraction=data.heldout_fraction, alpha=data.dirichlet_alpha, public_size=settings.public_size,
            public_file=settings.kd.public_file, task_eval_size=data.task_eval_size, task_train_size=data.task_train_size,
        )
        self._tokenized: dict = {}
        self._cost = None

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def vocab_size(self) -> int:
        """Token ids the model predicts (its LM head's outputs)."""
        return int(self.cost.head_linear // self.cost.hidden)

    @property
    def cost(self):
        """FLOPs estimates of this model's layers (``clients.cost.ModelCost``), read once."""
        if self._cost is None:
            from fedledger.clients.cost import ModelCost

            self._cost = ModelCost.of(self.model)
        return self._cost

    def public_examples(self, ids) -> list[dict]:
        """Tokenized public examples ``ids`` (indices into the public set), in that order."""
        public = self.examples("public-all")
        return [public[i] for i in ids]

    def examples(self, split: str, partition_id: int | None = None, poisoned: str | None = None,
                 categories: frozenset | None = None) -> list[dict]:
        """Tokenized examples of ``heldout``, ``root`` or a client ``partition`` (cached);
        ``public-all``: the whole public set, one entry per record (none dropped, so public ids
        index it on every party).

        ``categories`` keeps only records of those categories (e.g. a node's own held-out text).
        """
        key = (split, partition_id, poisoned, categories)
        if key not in self._tokenized and split == "public-all":
            self._tokenized[key] = data_lib.tokenize(self.splits["public"], self.tokenizer, self.settings.data.max_length,
                                                     keep_all=True)
        if key not in self._tokenized:
            records = self.splits["partitions"][partition_id] if split == "partition" else self.splits[split]
            if categories is not None:
                records = [r for r in records if r["category"] in categories] or records
            if poisoned:
                from fedledger.clients import attacks as attack_lib

                records = attack_lib.poison_records(records, poisoned, seed=self.settings.run.seed + (partition_id or 0))
            self._tokenized[key] = data_lib.tokenize(records, self.tokenizer, self.settings.data.max_length)
        return self._tokenized[key]

    def categories(self, partition_id: int) -> frozenset:
        return frozenset(r["category"] for r in self.splits["partitions"][partition_id])

    def evaluate(self, adapter, split: str = "heldout", max_batches: int | None = None) -> dict:
        """Loss, perplexity and top-1 accuracy on ``split``; with the held-out split also
        ``exact-match`` on the held-out task set (when ``task-eval-size`` > 0)."""
        result = self.evaluate_examples(adapter, self.examples(split), max_batches=max_batches)
        if split == "heldout" and self.splits.get("tasks"):
            result["exact-match"] = self.exact_match(adapter)
        return result

    def exact_match(self, adapter) -> float:
        """Share of the held-out task set that ``adapter`` answers exactly (greedy generation:
        each step computes the last position's logits only, never batch x length x vocabulary)."""
        model_lib.set_adapter(self.model, adapter)
        return train_lib.exact_match(self.model, self.tokenizer, self.splits["tasks"])

    def evaluate_examples(self, adapter, examples: list[dict], max_batches: int | None = None) -> dict:
        """Loss, perplexity and top-1 accuracy of ``adapter`` on tokenized ``examples`` (e.g. a
        fixed sample), through the chunked loss (``clients.loss.summed_loss_and_hits``)."""
        model_lib.set_adapter(self.model, adapter)
        return train_lib.evaluate(self.model, examples, self.pad_id, batch_size=16, max_batches=max_batches)


def get_task(settings: Settings, num_partitions: int) -> Task:
    """The cached Task of this process for these settings (built on first use)."""
    key = (settings.model_key(), settings.data, settings.public_size, settings.kd.public_file, num_partitions)
    with _LOCK:
        if key not in _CACHE:
            _CACHE.clear()  # one model per process: a new setting replaces the old one
            _CACHE[key] = Task(settings, num_partitions)
        return _CACHE[key]
