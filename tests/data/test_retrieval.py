"""RetrievalAugmentation: deterministic rewrites whose facts, chains and spans are there, in order, with the right
values; the share and size limits hold; the settings name themselves; the data module rewrites training rows only."""

import random

import pytest

from seer.data import MixedCorpus, PackedTextDataModule, RetrievalAugmentation, TextFilesCorpus
from seer.data.retrieval import Structure

NAMES = ["Elinor", "Marianne", "Willoughby", "Brandon", "Barton", "Norland", "Jennings", "Palmer"]
NOUNS = ["carriage", "letter", "garden", "cottage", "weather", "evening", "journey", "piano", "sister", "house"]
VERBS = ["walked", "spoke", "waited", "wrote", "smiled", "returned", "listened", "hoped"]


def prose(seed: int = 0, paragraphs: int = 40) -> str:
    """A novel-like chapter: paragraphs of sentences about names and nouns, separated by blank lines."""
    rng = random.Random(seed)

    def sentence():
        return (f"{rng.choice(NAMES)} {rng.choice(VERBS)} to the {rng.choice(NOUNS)} while {rng.choice(NAMES)} "
                f"thought of the {rng.choice(NOUNS)} and of {rng.choice(NAMES)}.")

    return "\n\n".join(" ".join(sentence() for _ in range(rng.randint(3, 7))) for _ in range(paragraphs)) + "\n"


def code(seed: int = 0, functions: int = 40) -> str:
    """A module: imports, then functions separated by blank lines."""
    rng = random.Random(seed)
    body = [f"def handle_{i}(request_value):\n    parsed_value = parse_input(request_value)\n"
            f"    return compute_total(parsed_value) + {rng.randint(0, 99)}\n" for i in range(functions)]
    return "import os\nfrom collections import deque\n\n\n" + "\n\n".join(body)


def in_order(text: str, pieces) -> bool:
    """Whether each of ``pieces`` occurs in ``text`` after the previous one."""
    start = 0
    for piece in pieces:
        found = text.find(piece, start)
        if found < 0:
            return False
        start = found + len(piece)
    return True


def mentions(line: str, key: str) -> bool:
    """Whether ``line`` names ``key`` (capitalised when it starts a sentence: "The carriage")."""
    return key in line or key[0].upper() + key[1:] in line


def lines(structure: Structure) -> list[str]:
    return [i.text for i in structure.insertions]


@pytest.mark.parametrize("document", [prose(), code()], ids=["prose", "code"])
def test_same_seed_same_text_and_another_seed_another(document):
    first = RetrievalAugmentation(share=1.0, seed=3)(document)
    assert first != document
    assert first == RetrievalAugmentation(share=1.0, seed=3)(document)
    assert RetrievalAugmentation(share=1.0, seed=4)(document) != first


@pytest.mark.parametrize("document", [prose(), code()], ids=["prose", "code"])
def test_facts_are_recalled_later_with_their_values(document):
    augment = RetrievalAugmentation(share=1.0, facts=(4, 4), recalls=(2, 2), chains=0, spans=0, max_share=0.2)
    structures = augment.structures(document)
    out = augment(document)
    assert len(structures) == 4 and {s.kind for s in structures} == {"fact"}
    assert len({s.keys for s in structures}) == 4  # distinct keys
    for s in structures:
        positions = [i.position for i in s.insertions]
        assert len(positions) == 3 and positions == sorted(set(positions))  # the fact, then two later recalls
        assert all(mentions(line, s.keys[0]) and s.value in line for line in lines(s))
        assert in_order(out, lines(s))
    assert len(out) - len(document) == sum(len(line) for s in structures for line in lines(s))


def test_code_facts_read_as_code_and_prose_facts_as_prose():
    augment = RetrievalAugmentation(share=1.0, facts=(6, 6), chains=0, spans=0, max_share=0.2)
    for s in augment.structures(code()):
        assert s.keys[0].isupper() and all(line.endswith("\n") and not line.endswith("\n\n") for line in lines(s))
    for s in augment.structures(prose()):
        assert all(line.lstrip("(")[0].isupper() and line.endswith((".\n\n", ".)\n\n")) for line in lines(s))
        assert s.keys[0] in NAMES or s.keys[0].removeprefix("the ") in NOUNS


@pytest.mark.parametrize("document", [prose(), code()], ids=["prose", "code"])
def test_chains_link_each_key_to_the_previous_and_recall_the_first_value(document):
    augment = RetrievalAugmentation(share=1.0, facts=0, chains=1, hops=(3, 3), spans=0, max_share=0.2)
    (chain,) = augment.structures(document)
    first, *links, recall = lines(chain)
    assert chain.kind == "chain" and len(links) == 3 and len(set(chain.keys)) == 4
    assert mentions(first, chain.keys[0]) and chain.value in first
    assert mentions(recall, chain.keys[-1]) and chain.value in recall
    for old, new, link in zip(chain.keys, chain.keys[1:], links):
        assert mentions(link, old) and mentions(link, new)
        rest = link.replace(old, "").replace(new, "").replace(new[0].upper() + new[1:], "")
        assert chain.value not in rest  # the value is only reached through the links
    assert in_order(augment(document), lines(chain))


@pytest.mark.parametrize("document", [prose(), code()], ids=["prose", "code"])
def test_spans_are_copied_verbatim_after_their_source(document):
    augment = RetrievalAugmentation(share=1.0, facts=0, chains=0, spans=(2, 2), span_words=(20, 80), max_share=0.2)
    structures = augment.structures(document)
    out = augment(document)
    assert [s.kind for s in structures] == ["span", "span"]
    for s in structures:
        assert 20 <= len(s.value.split()) <= 80
        source = document.index(s.value)
        assert s.insertions[0].position >= source + len(s.value)
        assert out.count(s.value) >= 2


def test_share_is_respected_and_short_documents_are_left_alone():
    documents = [prose(seed, paragraphs=12) for seed in range(300)]
    augment = RetrievalAugmentation(share=0.3, min_chars=1000)
    changed = sum(augment(d) != d for d in documents) / len(documents)
    assert 0.2 < changed < 0.4
    assert RetrievalAugmentation(share=0.0)(prose()) == prose()
    assert RetrievalAugmentation(share=1.0, min_chars=10**6)(prose()) == prose()


@pytest.mark.parametrize("max_share", [0.01, 0.03, 0.06])
def test_insertions_stay_under_max_share(max_share):
    augment = RetrievalAugmentation(share=1.0, max_share=max_share)
    for document in [prose(seed) for seed in range(10)] + [code(seed) for seed in range(10)]:
        assert len(augment(document)) - len(document) <= max_share * len(document)


def test_fingerprint_follows_the_settings():
    base = RetrievalAugmentation()
    assert base.fingerprint == RetrievalAugmentation().fingerprint
    assert base.fingerprint == RetrievalAugmentation(facts=[2, 6]).fingerprint  # a list as Hydra gives it
    for changed in [dict(share=0.4), dict(seed=1), dict(facts=(1, 3)), dict(hops=2), dict(max_share=0.05),
                    dict(value_kinds=["number"])]:
        assert RetrievalAugmentation(**changed).fingerprint != base.fingerprint, changed


@pytest.mark.parametrize("bad, name", [
    (dict(share=1.5), "share"), (dict(max_share=0.0), "max_share"), (dict(min_chars=-1), "min_chars"),
    (dict(facts=(3, 1)), "facts"), (dict(recalls=0), "recalls"), (dict(hops=[1, 2, 3]), "hops"),
    (dict(span_words=(0, 10)), "span_words"), (dict(value_kinds=["colour"]), "value_kinds"),
])
def test_bad_settings_fail_naming_the_setting(bad, name):
    with pytest.raises(ValueError, match=rf"RetrievalAugmentation: {name} must be"):
        RetrievalAugmentation(**bad)


def test_data_module_rewrites_training_rows_only(tmp_path, tok):
    for i in range(30):
        (tmp_path / f"chapter{i:02d}.txt").write_text(prose(i, paragraphs=12))
        (tmp_path / f"module{i:02d}.py").write_text(code(i, functions=20))
    corpus = MixedCorpus([TextFilesCorpus(str(tmp_path / "*.txt")), TextFilesCorpus(str(tmp_path / "*.py"))])

    def rows(augment):
        dm = PackedTextDataModule(corpus, tokenizer=tok, seq_len=256, train_sequences=8, val_sequences=2,
                                  val_fraction=0.2, augment=augment, cache_dir=tmp_path / "cache")
        dm.setup()
        return dm

    plain, augmented = rows(None), rows(RetrievalAugmentation(share=1.0, min_chars=1000))
    assert plain.rows.val.equal(augmented.rows.val)  # the same held-out documents, packed as they are
    assert not plain.rows.train.equal(augmented.rows.train)
    assert len(list((tmp_path / "cache").iterdir())) == 2  # one cache entry each
    assert "augment" not in plain.packing_settings()  # rows packed without it keep their cache key
    with pytest.raises(ValueError, match="augment must be a RetrievalAugmentation"):
        PackedTextDataModule(corpus, tokenizer=tok, augment="retrieval")
