"""Byzantine attacks for robustness experiments (pure numpy; no flwr, no torch needed).

Two kinds:

* **update attacks** rewrite the adapter a malicious node sends, working on the delta
  ``d = local - global`` and returning ``global + d'``:

  ============  ==============================================================================
  name          what the node sends (``d`` = its honest delta, ``g`` = the global adapter)
  ============  ==============================================================================
  sign-flip     ``g - scale * d``  (``scale`` = 1 by default: the exact opposite direction)
  scale         ``g + scale * d``  (``scale`` = 10 by default: same direction, 10x the norm)
  noise         ``g + N(0, sigma^2)`` per entry, ``sigma`` = ``noise_scale`` x the RMS of ``d``
                (default 3; the honest delta is discarded, so the direction is random)
  free-rider    ``g``: the global adapter unchanged (no training contribution, delta 0)
  adaptive      ``g + d - epsilon*||d||*m + r``: ``m`` = unit honest direction (own delta, or
                ``honest_mean`` if the attacker knows it), ``r`` random, orthogonal to ``m``,
                sized to keep ``||d'|| = ||d||``. Cosine with the honest direction ~``1-epsilon``
                (0.7 by default), honest norm: it stays inside the honest spread and pulls
                against the honest direction. Similarity defences are *not* expected to
                catch it: it measures their blind spot.
  ============  ==============================================================================

* **data attacks** leave the update path honest but train on poisoned records:

  ``label-shuffle`` (alias ``data-poison``): responses permuted across the node's records,
  so prompts are paired with unrelated answers; ``label-corrupt``: every response replaced
  by a random-token string built from the node's own vocabulary. Apply with
  :func:`poison_records` (the glue does it on the node's partition).

Every function takes an explicit ``numpy.random.Generator`` (or seed), so runs repeat.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

Arrays = Mapping[str, np.ndarray]


def _delta(local: Arrays, global_: Arrays) -> dict[str, np.ndarray]:
    if set(local) != set(global_):
        raise ValueError("local and global adapters must have the same tensor names")
    return {k: np.asarray(local[k], dtype=np.float32) - np.asarray(global_[k], dtype=np.float32) for k in local}


def _rebuild(global_: Arrays, delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: (np.asarray(global_[k], dtype=np.float32) + delta[k]).astype(np.float32) for k in delta}


def _norm(delta: Mapping[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(float(np.sum(np.square(v, dtype=np.float64))) for v in delta.values())))


def sign_flip(local: Arrays, global_: Arrays, rng: np.random.Generator, scale: float = 1.0, **_) -> dict[str, np.ndarray]:
    """Send ``global - scale * delta``: the update pointing the opposite way."""
    d = _delta(local, global_)
    return _rebuild(global_, {k: -float(scale) * v for k, v in d.items()})


def scaled(local: Arrays, global_: Arrays, rng: np.random.Generator, scale: float = 10.0, **_) -> dict[str, np.ndarray]:
    """Send ``global + scale * delta``: the honest direction with ``scale`` times the norm."""
    d = _delta(local, global_)
    return _rebuild(global_, {k: float(scale) * v for k, v in d.items()})


def gaussian_noise(local: Arrays, global_: Arrays, rng: np.random.Generator, noise_scale: float = 3.0,
                   **_) -> dict[str, np.ndarray]:
    """Send ``global + noise``; noise std = ``noise_scale`` x the RMS entry of the honest delta."""
    d = _delta(local, global_)
    count = sum(v.size for v in d.values())
    rms = _norm(d) / np.sqrt(max(count, 1))
    sigma = float(noise_scale) * (rms if rms > 0 else 1e-3)
    return _rebuild(global_, {k: rng.normal(0.0, sigma, size=v.shape).astype(np.float32) for k, v in d.items()})


def free_rider(local: Arrays, global_: Arrays, rng: np.random.Generator, **_) -> dict[str, np.ndarray]:
    """Send the global adapter back unchanged (delta exactly 0)."""
    _delta(local, global_)  # same layout check as the others
    return {k: np.array(v, dtype=np.float32, copy=True) for k, v in global_.items()}


def adaptive(local: Arrays, global_: Arrays, rng: np.random.Generator, epsilon: float = 0.3,
             honest_mean: Arrays | None = None, **_) -> dict[str, np.ndarray]:
    """Stay close to honest behaviour while pulling against the honest direction.

    With ``m`` the unit vector of the honest direction (``honest_mean - global`` if given, a
    colluding attacker that knows the honest mean; otherwise the node's own honest delta) and
    ``d`` the node's honest delta, send ``g + d'`` with
    ``d' = d - epsilon*||d||*m + r``, where ``r`` is random noise orthogonal to ``m`` sized so that
    ``||d'|| = ||d||``. Norm checks see an honest norm; the cosine with the honest direction is
    about ``1 - epsilon`` (0.7 by default), inside the usual spread of honest non-IID updates,
    and every such node removes ``epsilon`` of its share of progress. Colluders do not send
    identical vectors (``r`` differs per node).
    """
    d = _delta(local, global_)
    ref = _delta(honest_mean, global_) if honest_mean is not None else d
    dn, rn = _norm(d), _norm(ref)
    if dn == 0 or rn == 0:
        return _rebuild(global_, d)
    m = {k: v / rn for k, v in ref.items()}
    base = {k: d[k] - float(epsilon) * dn * m[k] for k in d}
    noise = {k: rng.normal(0.0, 1.0, size=v.shape).astype(np.float32) for k, v in d.items()}
    proj = sum(float(np.sum(noise[k] * m[k], dtype=np.float64)) for k in d)
    noise = {k: noise[k] - proj * m[k] for k in d}
    nn = _norm(noise)
    bn = _norm(base)
    extra = np.sqrt(max(dn * dn - bn * bn, 0.0))
    out = {k: base[k] + (extra / nn if nn > 0 else 0.0) * noise[k] for k in d}
    on = _norm(out)
    if on > 0:  # base may already be longer than d (honest_mean not along d): keep the honest norm
        out = {k: v * (dn / on) for k, v in out.items()}
    return _rebuild(global_, out)


UpdateAttack = Callable[..., dict[str, np.ndarray]]

#: update attacks: name -> function(local, global_, rng, **params)
ATTACKS: dict[str, UpdateAttack] = {
    "sign-flip": sign_flip,
    "scale": scaled,
    "noise": gaussian_noise,
    "free-rider": free_rider,
    "adaptive": adaptive,
}

#: data attacks: applied to the node's training records by :func:`poison_records`
DATA_ATTACKS = ("label-shuffle", "label-corrupt", "data-poison")

#: every name ``attack=<name>`` accepts (besides "none")
ALL_ATTACKS = tuple(ATTACKS) + DATA_ATTACKS


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown attack {name!r}; choose one of: none, {', '.join(ALL_ATTACKS)}")


def is_data_attack(name: str) -> bool:
    """True for attacks applied to training data, False for update attacks; ValueError if unknown."""
    if name in DATA_ATTACKS:
        return True
    if name in ATTACKS:
        return False
    raise _unknown(name)


def check_attack(name: str) -> str:
    """Return ``name`` if it is ``none`` or a known attack, else raise a ValueError listing choices."""
    if name != "none" and name not in ALL_ATTACKS:
        raise _unknown(name)
    return name


def apply_update_attack(name: str, local: Arrays, global_: Arrays, rng: np.random.Generator, **params) -> dict[str, np.ndarray]:
    """Rewrite a malicious node's adapter with update attack ``name`` (see the module table)."""
    if name not in ATTACKS:
        if name in DATA_ATTACKS:
            raise ValueError(f"attack {name!r} is a data attack: apply it with poison_records() to the training data")
        raise _unknown(name)
    return ATTACKS[name](local, global_, rng, **params)


def poison_records(records: list[dict], name: str = "label-shuffle", seed: int | np.random.Generator = 0) -> list[dict]:
    """Poisoned copies of chat records ``{"prompt", "response", ...}``; the input is not modified.

    ``label-shuffle``/``data-poison``: responses permuted (a derangement when possible, so no
    record keeps its own answer). ``label-corrupt``: each response replaced by as many random
    words drawn from the node's own responses (fluent-looking vocabulary, no meaning).
    """
    if name not in DATA_ATTACKS:
        raise _unknown(name) if name not in ATTACKS else ValueError(f"attack {name!r} is an update attack, not a data attack")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    out = [dict(r) for r in records]
    if len(out) < 2:
        return out
    responses = [r["response"] for r in records]
    if name in ("label-shuffle", "data-poison"):
        perm = rng.permutation(len(out))
        # turn the permutation into one without fixed points by rotating the fixed ones
        fixed = [i for i in range(len(perm)) if perm[i] == i]
        if len(fixed) == 1:
            j = (fixed[0] + 1) % len(perm)
            perm[fixed[0]], perm[j] = perm[j], perm[fixed[0]]
        elif len(fixed) > 1:
            vals = [perm[i] for i in fixed]
            for i, v in zip(fixed, vals[1:] + vals[:1]):
                perm[i] = v
        for i, r in enumerate(out):
            r["response"] = responses[int(perm[i])]
    else:  # label-corrupt
        vocab = [w for s in responses for w in str(s).split()] or ["x"]
        for r in out:
            n = max(1, len(str(r["response"]).split()))
            r["response"] = " ".join(vocab[int(i)] for i in rng.integers(0, len(vocab), size=n))
    return out


poison_texts = poison_records  # alias named in the issue
