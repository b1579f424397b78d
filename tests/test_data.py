import pytest

from fedledger.clients import data


def test_chatterbot_corpus_has_21_categories():
    records = data.load_corpus("chatterbot")
    assert len(records) > 2000
    assert len({r["category"] for r in records}) == 21


def test_splits_are_disjoint_and_cover_the_corpus():
    from collections import Counter

    s = data.federated_splits("chatterbot", 4, "natural", seed=1)
    key = lambda r: (r["category"], r["prompt"], r["response"])
    corpus = Counter(key(r) for r in data.load_corpus("chatterbot"))
    duplicated = {k for k, n in corpus.items() if n > 1}
    held, root = {key(r) for r in s["heldout"]}, {key(r) for r in s["root"]}
    train = {key(r) for p in s["partitions"] for r in p}
    # the only overlap allowed is a pair that the corpus itself holds twice
    assert (held & train) <= duplicated and (root & train) <= duplicated and (held & root) <= duplicated
    total = len(s["heldout"]) + len(s["root"]) + sum(len(p) for p in s["partitions"])
    assert total == sum(corpus.values())


def test_natural_partitions_do_not_share_categories():
    parts = data.federated_splits("chatterbot", 5, "natural", seed=0)["partitions"]
    cats = [{r["category"] for r in p} for p in parts]
    for i in range(len(cats)):
        for j in range(i + 1, len(cats)):
            assert not cats[i] & cats[j]


def test_iid_and_dirichlet_partitions():
    iid = data.federated_splits("chatterbot", 4, "iid", seed=0)["partitions"]
    sizes = [len(p) for p in iid]
    assert max(sizes) - min(sizes) <= 1
    dirichlet = data.federated_splits("chatterbot", 4, "dirichlet", seed=0, alpha=0.1)["partitions"]
    assert all(len(p) > 0 for p in dirichlet)
    assert max(len(p) for p in dirichlet) > 1.5 * min(len(p) for p in dirichlet)  # skewed


def test_partitions_are_deterministic():
    a = data.federated_splits("chatterbot", 3, "dirichlet", seed=7)["partitions"]
    b = data.federated_splits("chatterbot", 3, "dirichlet", seed=7)["partitions"]
    assert a == b


@pytest.mark.parametrize("call, needle", [
    (lambda: data.load_corpus("wikipedia"), "choose one of"),
    (lambda: data.federated_splits("chatterbot", 30, "natural", seed=0), "partitioner=dirichlet"),
    (lambda: data.federated_splits("chatterbot", 3, "random", seed=0), "unknown partitioner"),
    (lambda: data._fortunes_records("/nonexistent"), "apt-get install fortunes"),
])
def test_bad_data_requests_name_the_fix(call, needle):
    with pytest.raises(data.DataError) as err:
        call()
    assert needle in str(err.value)


def test_tokenize_masks_the_prompt(tiny_task):
    ex = tiny_task.examples("heldout")[0]
    assert ex["labels"][0] == -100 and ex["labels"][-1] != -100
    assert len(ex["labels"]) == len(ex["input_ids"])
