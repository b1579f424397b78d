"""A small task set with verifiable answers, generated offline with a fixed seed (no download).

Perplexity alone cannot say whether a model got *better at something*; these tasks have one
right answer each, so exact match can. Four kinds, short answers a 135M model can be
fine-tuned toward:

    task-add     "What is 3 + 5?"                   -> "8"         (operands 0..9)
    task-next    "What comes after Tuesday?"        -> "Wednesday" (days, months, number words)
    task-upper   "Write in capital letters: apple"  -> "APPLE"
    task-repeat  "Repeat twice: river"              -> "river river"

:func:`task_split` enumerates every task of every kind (about 260), shuffles them with the seed
and deals out a held-out evaluation set and a disjoint training set (records like the corpus
ones: ``{"category", "prompt", "response"}``). Training tasks join the clients' private pool
(``task-train-size``), so with natural partitioning each kind lands on some clients only: a
framework that moves knowledge between clients lets the others solve it too.
"""

from __future__ import annotations

import numpy as np

DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen", "twenty")
WORDS = ("apple", "river", "stone", "cloud", "garden", "window", "music", "paper", "silver", "forest", "candle",
         "bridge", "yellow", "planet", "orange", "winter", "summer", "pencil", "rabbit", "castle", "doctor",
         "island", "mirror", "number", "basket", "button", "coffee", "dragon", "engine", "finger", "hammer",
         "jacket", "kitten", "ladder", "market", "needle", "pillow", "rocket", "saddle", "tunnel", "violin",
         "wallet", "anchor", "butter", "circle", "desert", "feather", "guitar", "harbor", "lemon", "meadow",
         "noodle", "oyster", "pepper", "shadow", "spider", "temple", "valley", "wizard", "zebra")
KINDS = ("task-add", "task-next", "task-upper", "task-repeat")


def all_tasks() -> list[dict]:
    """Every task of every kind, in a fixed order."""
    out = [_task("task-add", f"What is {a} + {b}?", str(a + b)) for a in range(10) for b in range(10)]
    for seq in (DAYS, MONTHS, NUMBERS):
        out += [_task("task-next", f"What comes after {x}?", seq[(i + 1) % len(seq)])
                for i, x in enumerate(seq) if seq is not NUMBERS or i + 1 < len(seq)]
    out += [_task("task-upper", f"Write in capital letters: {w}", w.upper()) for w in WORDS]
    out += [_task("task-repeat", f"Repeat twice: {w}", f"{w} {w}") for w in WORDS]
    return out


def task_split(eval_size: int, train_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(held-out evaluation tasks, training tasks): disjoint, dealt from one seeded shuffle."""
    pool = all_tasks()
    if eval_size < 0 or train_size < 0 or eval_size + train_size > len(pool):
        raise ValueError(f"task-eval-size + task-train-size must be within 0..{len(pool)} (the tasks there are), "
                         f"got {eval_size} + {train_size}")
    order = np.random.default_rng(seed).permutation(len(pool))
    picked = [pool[i] for i in order[:eval_size + train_size]]
    return picked[:eval_size], picked[eval_size:]


def _task(kind: str, prompt: str, answer: str) -> dict:
    return {"category": kind, "prompt": prompt, "response": answer}


__all__ = ["KINDS", "all_tasks", "task_split"]
