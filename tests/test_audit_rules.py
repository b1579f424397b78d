"""The aggregator is the attacker: for every rule the auditor can replay, a committed aggregate
that is not what the rule computes from the recorded updates and trust decision is flagged,
naming the round and the rule; an honest run is verified; a user's own rule is said to be not
recomputed (exit 3), never OK."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.serverapp.strategy import (
    Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi, Krum, MultiKrum,
)

from fedledger.chain.audit import audit_run
from fedledger.chain.ledger import Ledger
from fedledger.chain.store import ArtifactStore
from fedledger.chain.trail import Enrolment, LedgerTrail
from fedledger.cli_chain import main as cli
from fedledger.core.pipeline import REPLAYABLE, RoundPipeline
from fedledger.core.trust import TrustDecision

from .test_chain_audit import Federation, problems

CLIENTS = 8   # Bulyan with one assumed attacker needs 4f + 3 = 7 updates after trust leaves one out
RULES = {
    "FedAvg": FedAvg,
    "FedProx": lambda: FedProx(proximal_mu=0.1),
    "FedMedian": FedMedian,
    "FedTrimmedAvg": lambda: FedTrimmedAvg(beta=0.2),
    "Krum": lambda: Krum(num_malicious_nodes=1),
    "MultiKrum": lambda: MultiKrum(num_malicious_nodes=1, num_nodes_to_select=3),
    "Bulyan": lambda: Bulyan(num_malicious_nodes=1),
    "FedAdam": FedAdam,
    "FedYogi": FedYogi,
    "FedAdagrad": FedAdagrad,
    "FedAvgM": lambda: FedAvgM(server_momentum=0.9),
}


@pytest.fixture()
def chain():
    """A fresh in-process chain per test (see tests/test_chain_audit.py)."""
    return Ledger.in_process()


class ForgedAggregate(LedgerTrail):
    """Stores and commits, for round 2, a well-formed aggregate other than the one computed."""

    def commit(self, server_round, aggregate, report):
        if server_round == 2 and aggregate is not None:
            aggregate = {k: (v + np.float32(0.01)).astype(v.dtype) for k, v in aggregate.items()}
        super().commit(server_round, aggregate, report)


class FixedTrust:
    """A trust stage that leaves client 0 out, clips every delta and weights by score."""

    def describe(self) -> dict:
        return {"name": "fixed-test-trust"}

    def decide(self, server_round, updates, global_arrays) -> TrustDecision:
        keys = [u.identity.key for u in updates]
        return TrustDecision(scores={k: 0.5 + 0.25 * i for i, k in enumerate(keys)}, excluded=(keys[0],),
                             clip_norm=0.1, reweight=True)


class MisrecordedTrust(LedgerTrail):
    """Records, for round 2, another trust decision than the one the aggregate was computed with."""

    def commit(self, server_round, aggregate, report):
        if server_round == 2 and report.trust is not None:
            recorded = TrustDecision.from_dict(report.trust)
            keys = sorted(recorded.scores)
            report.trust = TrustDecision(scores=dict(zip(keys, reversed([recorded.scores[k] for k in keys]))),
                                         excluded=(keys[1],), clip_norm=0.2, reweight=True).to_dict()
        super().commit(server_round, aggregate, report)


def run(name: str, chain, folder, trail_class=LedgerTrail, trust=None, strategy=None) -> Federation:
    fed = Federation(n=CLIENTS, seed=3)
    trail = trail_class(chain, ArtifactStore(str(folder)), fed.run_id, admin=chain.admin(),
                        enrolment=Enrolment("simulation"))
    fed.drive(RoundPipeline(strategy or RULES[name](), trail=trail, trust=trust))
    return fed


def test_every_replayable_rule_is_exercised():
    assert set(RULES) == REPLAYABLE


@pytest.mark.parametrize("name", sorted(RULES))
def test_forged_aggregate_is_flagged_naming_round_and_rule(name, chain, tmp_path):
    run(name, chain, tmp_path / "honest")
    honest = audit_run(str(tmp_path / "honest"), ledger=chain)
    assert honest.exit_code == 0, honest.table()
    assert [r.detail for r in honest.rows if r.kind == "aggregate"] == [f"{name} recomputed bit-exactly"] * 2

    run(name, chain, tmp_path / "forged", ForgedAggregate)
    forged = audit_run(str(tmp_path / "forged"), ledger=chain)
    assert problems(forged) == [(2, "aggregate", "MISMATCH")], forged.table()
    assert "round 2" in forged.problems[0].detail and name in forged.problems[0].detail
    assert forged.exit_code == 1


@pytest.mark.parametrize("name", sorted(RULES))
def test_aggregate_computed_with_another_trust_decision_is_flagged(name, chain, tmp_path):
    run(name, chain, tmp_path / "honest", trust=FixedTrust())
    honest = audit_run(str(tmp_path / "honest"), ledger=chain)
    assert honest.exit_code == 0, honest.table()

    run(name, chain, tmp_path / "lying", MisrecordedTrust, trust=FixedTrust())
    lying = audit_run(str(tmp_path / "lying"), ledger=chain)
    assert problems(lying) == [(2, "aggregate", "MISMATCH")], lying.table()
    assert name in lying.problems[0].detail and "trust decision" in lying.problems[0].detail


class MyAverage(FedAvg):
    """A user's own rule: the auditor cannot know its maths, even if it is FedAvg's."""


def test_users_own_rule_is_not_recomputed_and_exits_3(chain, tmp_path, capsys):
    run("", chain, tmp_path, strategy=MyAverage())
    report = audit_run(str(tmp_path), ledger=chain)
    assert report.exit_code == 3 and not report.problems, report.table()
    assert [r.status for r in report.rows if r.kind == "aggregate"] == ["NOT-RECOMPUTED"] * 2
    assert report.verdict.startswith("audit: no problem found, but 2 aggregate(s) NOT RECOMPUTED (MyAverage cannot "
                                     "be recomputed")
    assert cli(["audit", str(tmp_path)]) == 3   # (the CLI reads the eth-tester copy: NO-CHAIN as well)
    assert "2 aggregate(s) NOT RECOMPUTED (MyAverage cannot be recomputed" in capsys.readouterr().out
