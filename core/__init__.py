"""fedledger.core: the round contract the three families share (flwr + numpy only).

- :mod:`.update`    a train reply decoded once at the boundary: ``Update`` / ``Rejected``,
                    ``Identity``, ``Layout``, ``decode_replies``
- :mod:`.trust`     ``TrustDecision`` and ``apply_decision`` (the one place trust changes updates)
- :mod:`.pipeline`  ``RoundPipeline``: decode -> identify -> verify -> record -> trust ->
                    aggregate -> commit around any Flower strategy; ``RoundReport``
- :mod:`.replay`    ``Replay``: the auditor's recomputation of a recorded run's aggregates

``strategies/`` (trust stages, serverless relays) and ``chain/`` (the ledger audit trail, the
audit) build on this package and never on each other; ``fedledger/`` ties them together.
"""

from .pipeline import AuditTrail, Identities, NodeIdentities, Observer, RoundPipeline, RoundReport, TrustStage
from .trust import Contribution, TrustDecision, apply_decision
from .update import BoundaryError, Identity, Layout, Rejected, Update, decode_replies

__all__ = ["AuditTrail", "BoundaryError", "Contribution", "Identities", "Identity", "Layout", "NodeIdentities",
           "Observer", "Rejected", "RoundPipeline", "RoundReport", "TrustDecision", "TrustStage", "Update",
           "apply_decision", "decode_replies"]
