"""Glue for KD-FedLLM and Split-FedLLM: the server's half of the ML, and the runners built from settings.

``strategies/kd.py`` and ``strategies/split.py`` own the message choreography and never import
torch; what they need from the server's model comes from here:

- :class:`KDServerModel` (a ``strategies.kd.KDServer``): rows of a public batch, the server
  model's own distribution (for trust), server-side distillation (variant ``server``);
- ``clients.split.SplitServer`` (a ``strategies.split.SplitServerPart``): the shared server part.

:func:`build_runner` maps typed settings onto a runner; :func:`preflight` checks what needs the
model's config or the data (``split-layer`` against the decoder blocks, ``kd-top-k`` against the
vocabulary, a public file against the held-out split) before any weights load.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np

from fedledger.clients import distill
from fedledger.clients import model as model_lib

from .config import ConfigError, Settings

log = logging.getLogger("fedledger")


class KDServerModel:
    """The server's model in a KD run (the ServerApp's Task: its model, public set, settings)."""

    def __init__(self, task, settings: Settings):
        self.task, self.settings = task, settings
        self.vocab_size = task.vocab_size
        self.public_size = len(task.splits["public"])

    def rows(self, public_ids: Sequence[int]) -> int:
        return distill.answer_rows(self.task.public_examples(public_ids))

    def base_probs(self, arrays: Mapping[str, np.ndarray], public_ids: Sequence[int], keys: np.ndarray,
                   temperature: float) -> np.ndarray:
        model_lib.set_adapter(self.task.model, dict(arrays))
        return distill.probs_at(self.task.model, self.task.public_examples(public_ids), self.task.pad_id, keys,
                                self.vocab_size, temperature)

    def distil(self, arrays: Mapping[str, np.ndarray], public_ids: Sequence[int], soft: Mapping[str, np.ndarray],
               seed: int) -> tuple[dict[str, np.ndarray], dict]:
        from fedledger.core import softlabels

        s, t = self.settings, self.settings.train
        examples = self.task.public_examples(public_ids)
        model_lib.set_adapter(self.task.model, dict(arrays))
        stats = distill.distil_steps(self.task.model, examples, soft[softlabels.PROBS], soft[softlabels.AGG_IDS],
                                     self.task.pad_id, s.kd.distil_steps, t.batch_size, t.learning_rate,
                                     s.kd.temperature, seed)
        seq = stats["distil-tokens"] / max(1, s.kd.distil_steps * min(t.batch_size, len(examples)))
        stats["flops"] = self.task.cost.train(stats["distil-tokens"], int(round(seq)))
        return model_lib.get_adapter(self.task.model), stats


def build_runner(settings: Settings, task, num_nodes: int, *, identities, trail=None, max_examples: int):
    """The KD or split runner of a run (``strategy="kd"`` | ``"split"``)."""
    from .strategy_factory import build_topology

    common = {"identities": identities, "trail": trail, "local_steps": settings.train.local_steps,
              "seed": settings.run.seed, "max_examples": max_examples}
    topology = build_topology(settings, num_nodes)
    if settings.strategy.name == "kd":
        from fedledger.strategies.kd import KDRunner

        kd = settings.kd
        return KDRunner(KDServerModel(task, settings), topology, variant=kd.variant, k=kd.top_k,
                        temperature=kd.temperature, public_batch=kd.public_batch, trust=_kd_trust(settings), **common)
    from fedledger.clients.split import SplitServer, side_names
    from fedledger.strategies.split import SplitRunner

    layer = settings.split.layer
    server = SplitServer(task.model, layer, settings.train.learning_rate)
    server.vocab_size, server.hidden_size = task.vocab_size, task.cost.hidden
    client_names, _ = side_names(list(task.initial_adapter), layer)
    return SplitRunner(server, topology, split_layer=layer, client_names=client_names, dtype=settings.split.dtype,
                       batch_size=settings.train.batch_size, max_length=settings.data.max_length, **common)


def _kd_trust(settings: Settings):
    """PageRank trust on soft-label vectors: the adapters' scorer, without clipping or reweighting."""
    if settings.trust.mode != "pagerank":
        return None
    from fedledger.strategies.pagerank import PageRankScorer

    t = settings.trust
    return PageRankScorer(threshold=t.threshold, pretrusted=t.pretrusted or None, damping=t.damping,
                          norm_tol=t.norm_tol, history_weight=t.history_weight, anchor=t.anchor, clip=False,
                          reweight=False)


def preflight(settings: Settings, num_nodes: int) -> None:
    """The checks that need the model's config or the data, before any weights load (ConfigError)."""
    if settings.strategy.name in ("kd", "split"):
        settings.check_model(model_lib.model_facts(settings.model.name, settings.model.cache_dir()))
    if settings.kd.public_file:
        check_public_file(settings, num_nodes)


def check_public_file(settings: Settings, num_nodes: int) -> None:
    """A public file must not hold held-out records (it would be evaluation data taught to the model)."""
    from fedledger.clients import data as data_lib

    d = settings.data
    try:
        public = data_lib.load_public_file(settings.kd.public_file)
        records = data_lib.load_corpus(d.dataset)
        _, heldout = data_lib.split_heldout(records, d.heldout_fraction, settings.run.seed)
    except data_lib.DataError as exc:
        raise ConfigError(str(exc), "kd-public") from None
    n = data_lib.overlap(public, heldout)
    if n:
        raise ConfigError(f"run-config kd-public={settings.kd.public_file!r} is not valid: {n} of its {len(public)} "
                          f"records are in the held-out split (evaluation data); remove them or use the public split "
                          f"(kd-public=\"\")", "kd-public")


__all__ = ["KDServerModel", "build_runner", "check_public_file", "preflight"]
