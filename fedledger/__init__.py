"""fedledger: federated LoRA fine-tuning on Flower with an auditable Ethereum ledger.

The top-level folders ``core/``, ``strategies/``, ``clients/`` and ``chain/`` install as
``fedledger.core``, ``fedledger.strategies``, ``fedledger.clients`` and ``fedledger.chain``.  When Flower runs the
app from its FAB copy (or from a source checkout without installing), this package's folder
is first on ``sys.path`` and the four siblings are not inside it; appending the parent folder
to ``__path__`` makes ``fedledger.strategies`` resolve to the sibling folder of *this* copy.
"""

from __future__ import annotations

import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_root = _os.path.dirname(_here)
if all(_os.path.isdir(_os.path.join(_root, d)) for d in ("core", "strategies", "clients", "chain")):
    if _root not in __path__:
        __path__.append(_root)  # type: ignore[name-defined]

__version__ = "0.1.0"
