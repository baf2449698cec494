"""RULER in seer.eval: tasks from the package's settings, generation deterministic and within the length, RULER's
scoring, the harness's keys and dense values, bad input refused before a model loads."""

import json
import re
from collections import Counter

import pytest
import torch

import seer.model.loading
from seer.checks import ConfigError
from seer.config import compose
from seer.eval import run_eval
from seer.evaluation import ruler
from seer.evaluation.config import EvalConfig
from tests.evaluation.test_eval_entry import BASE
from tests.tiny import tiny_model

# every task whose smallest prompt fits 2048 tokens of the tiny tokenizer (qa_2's ten HotpotQA paragraphs do not)
FITTING = [t for t in ruler.RULER_TASKS if t != "qa_2"]


def test_task_names_and_settings_are_the_packages():
    import yaml

    package = yaml.safe_load((ruler._package_dir() / "synthetic.yaml").read_text())
    assert tuple(package) == ruler.RULER_TASKS and len(ruler.RULER_TASKS) == 13
    assert {t: ruler.task_spec(t)["tokens_to_generate"] for t in ("niah_single_1", "vt", "cwe", "fwe", "qa_1")} == \
        {"niah_single_1": 128, "vt": 30, "cwe": 120, "fwe": 50, "qa_1": 32}
    assert [t for t in ruler.RULER_TASKS if ruler.task_spec(t)["metric"] == "string_match_part"] == ["qa_1", "qa_2"]
    assert ruler.task_spec("qa_1")["template"].endswith("Question: {query} Answer:")


def test_resolve_tasks():
    assert ruler.resolve_tasks("all") == list(ruler.RULER_TASKS)
    assert ruler.resolve_tasks(["vt", "niah_single_1", "vt"]) == ["niah_single_1", "vt"]
    with pytest.raises(ValueError, match=r"unknown RULER task\(s\) \['niah'\]; choose from niah_single_1, .*or all"):
        ruler.resolve_tasks(["niah"])


@pytest.mark.parametrize("override, tasks", [("eval.ruler=all", list(ruler.RULER_TASKS)),
                                             ("eval.ruler=[qa_1,vt]", ["vt", "qa_1"]), ("eval=default", [])])
def test_ruler_key_from_the_command_line(override, tasks):
    from omegaconf import OmegaConf

    from seer.checks import build

    config = build(EvalConfig, "eval", OmegaConf.to_container(compose([override], "eval").eval))
    assert config.ruler == tasks and config.ruler_samples == 10


@pytest.mark.parametrize("task", FITTING)
def test_generation_is_deterministic_and_fits(tokenizer, task):
    samples = ruler.generate_samples(tokenizer, task, 2048, 3, seed=0, start_id=1)
    again = ruler.generate_samples(tokenizer, task, 2048, 3, seed=0, start_id=1)
    other = ruler.generate_samples(tokenizer, task, 2048, 3, seed=1, start_id=1)
    assert [s.prompt for s in samples] == [s.prompt for s in again]
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(samples, again))
    assert [s.prompt for s in samples] != [s.prompt for s in other]
    assert len({s.prompt for s in samples}) == 3  # samples differ from each other
    for s in samples:
        ids = s.input_ids.tolist()
        assert ids == [1] + tokenizer(s.prompt, add_special_tokens=False)["input_ids"]
        assert len(ids) + s.max_new_tokens <= 2048
        assert s.max_new_tokens == ruler.task_spec(task)["tokens_to_generate"] and s.answers
        if not task.startswith("qa"):  # haystacks grow in small steps: the length is nearly used up
            assert len(ids) + s.max_new_tokens > 0.9 * 2048, (task, len(ids))
    longer = ruler.generate_samples(tokenizer, task, 3072, 1, seed=0, start_id=1)[0]
    assert len(longer.input_ids) > len(samples[0].input_ids)


def _words(prompt: str, start: str) -> Counter:
    return Counter(re.findall(r"[a-z]+", prompt[prompt.rindex(start):].split("Question:")[0]))


@pytest.mark.parametrize("task", FITTING)
def test_answers_are_what_the_prompt_holds(tokenizer, task):
    s = ruler.generate_samples(tokenizer, task, 2048, 1, seed=0, start_id=1)[0]
    p = s.prompt
    if task.startswith("niah"):
        for answer in s.answers:
            assert p.count(f"is: {answer}.") == 1
        n_answers = {"niah_multivalue": 4, "niah_multiquery": 4}.get(task, 1)
        assert len(s.answers) == n_answers
        assert ("magic numbers for" in p.split("\n")[-1]) == (n_answers > 1)  # RULER's singular for one answer
    elif task == "vt":
        names = s.answers
        assert len(names) == 5 and all(re.fullmatch(r"[A-Z]{5}", n) for n in names)
        value = re.search(rf"VAR {names[0]} = (\d+)", p).group(1)
        for a, b in zip(names, names[1:]):
            assert f"VAR {b} = VAR {a} " in p
        assert p.endswith(f"5 variables are assgined the value {value}, they are: ")
        assert p.count("VAR ") == 2 * 9  # two chains (the worked example, the asked one) of 1 + 4 x 2 names
    elif task == "cwe":
        counts = _words(p, "Below is a numbered list")
        assert {w for w, _ in counts.most_common(10)} == set(s.answers) and counts[s.answers[0]] == 6
    elif task == "fwe":
        counts = Counter(p.split("coded words. ")[1].split("\nQuestion:")[0].split())
        assert [w for w, _ in counts.most_common(4)] == ["..."] + s.answers
    else:
        assert p.endswith("Answer:") and "Document 1:\n" in p


def test_qa_2_fits_a_real_tokenizer_at_4k():
    from omegaconf import OmegaConf

    from seer.model.config import ModelConfig
    from seer.model.loading import load_tokenizer

    tok = load_tokenizer(ModelConfig(**OmegaConf.to_container(compose(["model=smollm2"], "eval").model)))
    (s,) = ruler.generate_samples(tok, "qa_2", 4096, 1, seed=0, start_id=tok.eos_token_id)
    assert len(s.input_ids) + 32 <= 4096 and s.prompt.count("Document ") >= 10


def test_scoring_is_rulers():
    from long_context_eval.eval.synthetic import constants as reference

    predictions = ["The numbers are 1234567 and 7654321.", "nothing", "VAR ABCDE, fghij", " Paris\x00 ", ""]
    references = [["1234567", "7654321", "1111111"], ["1"], ["abcde", "FGHIJ"], ["paris", "London"], ["x"]]
    mine = [ruler.string_match_all(ruler.postprocess(p), r) for p, r in zip(predictions, references)]
    assert mine == pytest.approx([200 / 3, 0.0, 100.0, 50.0, 0.0])
    assert mine == pytest.approx(reference.string_match_all_per_sample(
        [ruler.postprocess(p) for p in predictions], references))
    part = [ruler.string_match_part(ruler.postprocess(p), r) for p, r in zip(predictions, references)]
    assert part == [100.0, 0.0, 100.0, 100.0, 0.0]
    assert part == reference.string_match_part_per_sample([ruler.postprocess(p) for p in predictions], references)
    assert ruler.postprocess(" a\x01b\n ") == "a\nb"
    assert ruler.score("qa_1", "It is Paris, I think", ["paris", "london"]) == 100.0
    assert ruler.score("niah_multivalue", "1, 2", ["1", "2", "3", "4"]) == 50.0


def test_sentences_and_zeta():
    import math

    assert ruler.split_sentences('A b. C d! "E f?" G (h.) I j. k l.  M') == ["A b.", "C d!", '"E f?"', "G (h.)",
                                                                             "I j. k l.", "M"]
    assert ruler._zeta(2.0) == pytest.approx(math.pi ** 2 / 6, rel=1e-10)
    assert ruler._zeta(3.0) == pytest.approx(1.2020569031595942, rel=1e-10)


def test_greedy_answers_are_greedy_generation_and_stop():
    model = tiny_model("llama", seed=0)
    ids = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(0))
    expected = model.generate(ids[None], max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=2,
                              min_new_tokens=6)[0, 40:].tolist()
    assert ruler.greedy_answers(model, [ids], 6, set()) == [expected]
    stop = expected[2]
    assert ruler.greedy_answers(model, [ids], 6, {stop}) == [expected[:expected.index(stop)]]


def test_greedy_answers_of_a_batch_are_each_prompts_alone_with_sparse_prefill():
    from seer.model.attention import prepare_model
    from seer.sparsity.config import SparsityConfig
    from seer.sparsity.selectors import build_selector

    model = tiny_model("llama", seed=0)
    ctx = prepare_model(model, 16)
    ctx.update(mode="sparse", selector=build_selector("block_mean"),
               sparsity=SparsityConfig(method="topk", target_density=0.3, dense_last_rows=0))  # 2-5 blocks a prompt
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 320, (n,), generator=gen) for n in (70, 25, 48)]
    alone = [ruler.greedy_answers(model, [p], 8, set())[0] for p in prompts]
    stop = alone[1][3]  # the second prompt stops early, the others go on
    alone = [ruler.greedy_answers(model, [p], 8, {stop})[0] for p in prompts]
    assert ruler.greedy_answers(model, prompts, 8, {stop}) == alone
    assert len(alone[1]) == 3 and ctx.mean_density() < 0.6


@pytest.fixture
def text_files(tmp_path, corpus):
    for i, doc in enumerate(corpus.docs):
        (tmp_path / f"doc{i}.txt").write_text(doc)
    return f"data.corpus.paths={tmp_path}/*.txt"


RULER_RUN = [o for o in BASE if not o.startswith("eval.seq_lens")] + [
    "eval.seq_lens=[2048]", "eval.windows=1", "eval.passkey=0", "eval.copy=0", "eval.recall=false",
    "eval.ruler=[niah_single_1,niah_multivalue]", "eval.ruler_samples=2", "data=text_files"]


def test_eval_writes_ruler_keys_beside_dense(tmp_path, monkeypatch, tokenizer, text_files):
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tokenizer)
    over = RULER_RUN + [text_files, "selector=oracle", f"paths.cache_dir={tmp_path}/c"]
    rows = run_eval(compose(over + ["sparsity=dense", f"paths.output_dir={tmp_path}/d"], "eval"))
    (row,) = json.loads((tmp_path / "d" / "metrics.json").read_text())
    assert row == json.loads(json.dumps(rows[0]))
    for key in ("ruler", "ruler_dense", "ruler/niah_single_1", "ruler/niah_single_1_dense", "ruler/niah_multivalue",
                "ruler/niah_multivalue_dense", "ruler_density"):
        assert row[key] is not None and 0 <= row[key] <= 100, key
    assert row["ruler"] == pytest.approx((row["ruler/niah_single_1"] + row["ruler/niah_multivalue"]) / 2)
    # the oracle with a dense budget attends to everything: the same answers as dense
    assert row["ruler"] == row["ruler_dense"] and row["ruler_density"] == 1.0
    (cached,) = (tmp_path / "c" / "eval").glob("dense-*.json")
    assert json.loads(cached.read_text())["2048"]["ruler"] == row["ruler_dense"]
    sparse = run_eval(compose(over + ["sparsity=topk", "sparsity.target_density=0.3", f"paths.output_dir={tmp_path}/s"],
                              "eval"))[0]
    assert 0.2 < sparse["ruler_density"] < 0.45 and sparse["ruler_dense"] == row["ruler_dense"]
    # every sample's answer beside the dense model's (read back from the dense cache by the second run)
    for folder, got in (("d", row), ("s", sparse)):
        answers = [json.loads(line) for line in (tmp_path / folder / "ruler_answers.jsonl").read_text().splitlines()]
        assert "ruler_answers" not in got
        for task in ("niah_single_1", "niah_multivalue"):
            mine = [a for a in answers if a["task"] == task]
            assert [a["sample"] for a in mine] == list(range(len(mine))) and len(mine) > 0
            assert all(a["seq_len"] == 2048 and a["references"] for a in mine)
            assert sum(a["score"] for a in mine) / len(mine) == pytest.approx(got[f"ruler/{task}"])
            assert sum(a["dense_score"] for a in mine) / len(mine) == pytest.approx(got[f"ruler/{task}_dense"])
            if folder == "d":
                assert all(a["answer"] == a["dense_answer"] for a in mine)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_harness_scores_what_the_model_answers(model, tokenizer, corpus, monkeypatch, batch_size):
    """With answers forced (all of them, or only the first), the scores are RULER's over the right samples, one
    sample a prefill or several."""
    from seer.evaluation.data import HeldOutText
    from seer.evaluation.harness import Evaluator
    from seer.model.attention import prepare_model

    prepare_model(model, 16)
    text = HeldOutText(corpus, tokenizer, split="all", progress=False)
    config = EvalConfig(seq_lens=[2048], windows=1, calibration_windows=0, passkey=0, copy=0, recall=False,
                        perplexity=False, timing=False, ruler=["niah_single_2", "niah_multivalue", "qa_1"],
                        ruler_samples=5, batch_size=batch_size)
    ev = Evaluator(model, tokenizer, text, config, progress=False)
    by_ids = {tuple(s.input_ids.tolist()): s for task in ev.ruler[2048].values() for s in task}

    def first_answers(_model, prompts, max_new, _stop):
        assert len(prompts) <= batch_size
        return [tokenizer(" " + by_ids[tuple(ids.tolist())].answers[0], add_special_tokens=False)["input_ids"]
                for ids in prompts]

    monkeypatch.setattr(ruler, "greedy_answers", first_answers)
    got = ev.dense()[2048]
    assert got["ruler/niah_single_2"] == 100.0 and got["ruler/qa_1"] == 100.0
    assert got["ruler/niah_multivalue"] == 25.0 and got["ruler"] == pytest.approx(75.0)
    samples = [s for task in ev.ruler[2048].values() for s in task]
    assert [(a["task"], a["sample"]) for a in got["ruler_answers"]] == [(s.task, s.index) for s in samples]
    for answer, sample in zip(got["ruler_answers"], samples):
        assert answer["answer"].strip() == sample.answers[0] and answer["references"] == sample.answers
        assert answer["score"] == (25.0 if sample.task == "niah_multivalue" else 100.0)


@pytest.mark.parametrize("override, message", [
    ("eval.ruler=[niah_single_1,needle]", r"eval.ruler=\['niah_single_1', 'needle'\]: unknown RULER task\(s\) "
                                         r"\['needle'\]; choose from niah_single_1, niah_single_2, .*, qa_2 or all"),
    ("eval.seq_lens=[8192]", r"eval.seq_lens=\[8192\]: longer than the model's context of 4096 tokens"),
    ("eval.ruler=[qa_2]", r"eval.ruler: a qa_2 sample does not fit 2048 tokens \(its smallest prompt is \d+ tokens, "
                          r"and 32 are generated\); use longer eval.seq_lens or leave qa_2 out"),
    ("eval.ruler_samples=0", "eval.ruler_samples=0: must be an integer >= 1"),
])
def test_bad_ruler_input_is_refused_before_loading(tmp_path, monkeypatch, tokenizer, text_files, override, message):
    def no_loading(*a, **k):
        raise AssertionError("loaded a model before checking the arguments")

    monkeypatch.setattr(seer.model.loading, "load_causal_lm", no_loading)
    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tokenizer)
    over = RULER_RUN + [text_files, "selector=streaming", override, f"paths.output_dir={tmp_path}"]
    with pytest.raises(ConfigError, match=message):
        run_eval(compose(over, "eval"))


def test_ruler_without_the_extra_says_how_to_install(tmp_path, monkeypatch, text_files):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "long_context_eval" else find_spec(name, *a))
    with pytest.raises(ConfigError, match=r"eval.ruler=\['vt'\]: RULER needs long_context_eval: "
                                          r"pip install 'seer\[ruler\]'"):
        run_eval(compose(RULER_RUN + [text_files, "eval.ruler=[vt]", f"paths.output_dir={tmp_path}"], "eval"))
    EvalConfig()  # without RULER nothing is needed


def test_wandb_gets_the_ruler_values(tmp_path, monkeypatch, tokenizer, text_files):
    from tests.training.wandb_offline import offline_run, offline_runs, records

    monkeypatch.setattr(seer.model.loading, "load_tokenizer", lambda _cfg: tokenizer)
    monkeypatch.setenv("WANDB_MODE", "offline")
    over = [o for o in RULER_RUN if o != "logger=none"] + [
        text_files, "logger=wandb", "selector=streaming", "sparsity=topk", "sparsity.target_density=0.3",
        "eval.ruler=[fwe]", "eval.ruler_samples=1", f"paths.output_dir={tmp_path}/w", f"paths.cache_dir={tmp_path}/c"]
    (row,) = run_eval(compose(over, "eval"))
    (run_dir,) = offline_runs(tmp_path / "w")
    assert offline_run(run_dir)["exit_code"] == 0  # waits until W&B's service has written the whole run
    summary = {}
    for record in records(next(run_dir.glob("run-*.wandb"))):
        if record.WhichOneof("record_type") == "summary":
            summary.update({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.summary.update})
    for key in ("ruler", "ruler_dense", "ruler/fwe", "ruler/fwe_dense", "ruler_density"):
        assert summary[f"{key}/2048"] == pytest.approx(row[key]), key
    (table_row,) = [r for r in offline_run(run_dir)["history"] if "eval/ruler_answers/path" in r]
    table = json.loads((run_dir / "files" / table_row["eval/ruler_answers/path"]).read_text())
    (answer,) = [json.loads(line) for line in (tmp_path / "w" / "ruler_answers.jsonl").read_text().splitlines()]
    assert table["columns"][:5] == ["seq_len", "task", "sample", "score", "dense_score"]
    assert table["data"] == [[2048, "fwe", 0, answer["score"], answer["dense_score"], answer["answer"],
                              answer["dense_answer"], " | ".join(answer["references"])]]
