"""The audit's documented claims point at tests that exist: every ``test_...`` that README.md and
docs/THREAT_MODEL.md name is defined under tests/ (a renamed or deleted test fails here, so no
claim is left backed by nothing), and the README's audit sections link the threat model."""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", os.path.join("docs", "THREAT_MODEL.md"))


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
        return fh.read()


def defined_tests() -> set[str]:
    names = set()
    for path in glob.glob(os.path.join(ROOT, "tests", "**", "test_*.py"), recursive=True):
        with open(path, encoding="utf-8") as fh:
            names.update(re.findall(r"^\s*def (test_\w+)\(", fh.read(), re.M))
    return names


def named_tests(text: str) -> set[str]:
    """``test_...`` names in backticks, as the documents cite them (``file.py::test_x`` or ``test_x``)."""
    return {m for m in re.findall(r"(?:::|`)(test_[a-z0-9_]+)`", text)}


@pytest.mark.parametrize("doc", DOCS)
def test_every_test_a_document_names_exists(doc):
    named = named_tests(_read(doc))
    assert named, f"{doc} names no test"
    assert sorted(named - defined_tests()) == []


def test_the_threat_model_names_a_test_for_every_attack_of_the_issue():
    text = _read(DOCS[1])
    for attack in ("example_count", "invented", "dropped_client_contests", "dropped_client_that_cannot_contest",
                   "another_registry", "another_round_or_run", "edited_run_record", "edited_round_document",
                   "zero_aggregate", "forged_aggregate"):
        assert re.search(rf"test_\w*{attack}\w*", text), attack


def test_the_readme_audit_sections_link_the_threat_model():
    readme = _read("README.md")
    for start, end in (("## On-chain audit", "## Add fedledger to your Flower app"),
                       ("## Add fedledger to your Flower app", "### Public API")):
        section = readme[readme.index(start):readme.index(end)]
        assert "docs/THREAT_MODEL.md" in section, start
