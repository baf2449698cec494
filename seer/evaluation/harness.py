"""The evaluation harness: one model, its held-out windows and retrieval cases, and any scorer x budget on them.

:class:`Evaluator` holds a model prepared for seer (:func:`seer.model.attention.prepare_model` or
:func:`~seer.model.attention.attach_gates`), builds the windows and cases of :class:`EvalConfig` once, and then measures
any selection: ``evaluate(selector, sparsity)`` with ``selector`` a training-free scorer of
:mod:`seer.sparsity.selectors` or None for the model's gates, and optionally ``layer_selectors`` (``{layer: selector}``,
:attr:`seer.model.attention.SeerContext.layer_selectors`) scoring some layers instead. Every selection runs through the
same path as inference (the model's attention function, the block-sparse kernel or its reference), so methods differ
only in the blocks they keep. For each window length it returns one row of flat metrics (see :data:`ROW_KEYS`).

A calibrated budget is calibrated on the first ``calibration_windows`` windows of each length (scores observed with the
model running dense; cached per scorer (layer selectors included) and length, so many budgets and densities share one
observation) and evaluated on the next ``windows``: the knob found and the density it reached there are reported beside
the density achieved on the evaluated windows. :meth:`Evaluator.calibration_ppl` measures a selection's perplexity on
the calibration windows instead (to choose between selections without looking at the evaluated windows).
:meth:`Evaluator.dense` measures the dense model once (cached on disk
when a cache folder is given), prefill and decode dense.

A model with decode gates (:func:`seer.model.decode_gate_io.load_decode_gates`) answers the generated measures
(passkey, RULER) with sparse decode steps when ``evaluate`` is given a decode budget: rows name it (``decode``) and
hold ``decode_density``, the achieved decode density (``model.seer_decode``) averaged over the generations.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any

import torch

from seer.evaluation import ruler
from seer.evaluation.config import EvalConfig
from seer.evaluation.data import HeldOutText
from seer.evaluation.tasks import CopyCase, PasskeyCase, copy_cases, passkey_cases
from seer.files import atomic_write_text
from seer.model.attention import LayerObservation, SeerContext, scorer_name
from seer.sparsity import SparsityConfig, block_density, mass_recall, oracle_recall
from seer.sparsity.calibration import Calibration, calibrate_in_rounds
from seer.sparsity.decode import DecodeSparsityConfig

# what each row of results holds (measures that were off are None)
ROW_KEYS = ("selector", "sparsity", "method", "allocation", "target_density", "knob", "knob_min", "knob_max",
            "calibrated_density", "density", "density_by_layer", "seq_len", "tokens", "ppl", "ppl_dense",
            "ppl_increase", "ppl_half", "ppl_half_dense", "recall", "oracle_recall", "recall_by_layer", "passkey",
            "passkey_dense", "passkey_density", "copy", "copy_dense", "copy_nll", "copy_nll_dense", "select_ms",
            "attention_ms", "prefill_ms", "dense_prefill_ms", "ruler", "ruler_dense", "ruler_density", "decode",
            "decode_density")
# beside these, a row with RULER holds ``ruler/<task>`` and ``ruler/<task>_dense`` for each task run, and
# ``ruler_answers``: each sample's answer (:meth:`Evaluator._ruler`) with the dense model's beside it (``dense_answer``,
# ``dense_score``; absent from a dense pass cached before answers were kept)
PASSKEY_NEW_TOKENS = 8
_LOGIT_CHUNK = 1024  # positions per LM-head chunk: full-vocabulary logits of a long window never exist at once


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


class Evaluator:
    """See the module docstring. ``model``: a causal LM prepared for seer, on its device; ``text``: the held-out
    token stream; ``kernel``: ``triton`` or ``reference`` for sparse attention; ``cache_dir``: where dense results
    are kept (None: not cached); ``model_name``: part of the dense cache key; ``ruler_samples``: the RULER samples of
    :func:`seer.evaluation.ruler.ruler_samples` for ``config`` (None: generated here)."""

    def __init__(self, model, tokenizer, text: HeldOutText, config: EvalConfig, kernel: str = "reference",
                 cache_dir: str | Path | None = None, model_name: str = "model", progress: bool = True,
                 ruler_samples: dict[int, dict[str, list[ruler.RulerSample]]] | None = None):
        self.model, self.tokenizer, self.text, self.config = model, tokenizer, text, config
        self.ctx: SeerContext = model.seer_context
        self.ctx.update(kernel=kernel)
        self.device = next(model.parameters()).device
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.model_name = model_name
        self.progress = progress
        self.max_len = getattr(model.config, "max_position_embeddings", None)
        if self.max_len is not None and max(config.seq_lens) > self.max_len:
            raise ValueError(f"eval.seq_lens={config.seq_lens}: longer than the model's context "
                             f"({self.max_len} tokens)")
        per_length = config.calibration_windows + config.windows
        self.windows = {n: text.windows(n, per_length) for n in config.seq_lens}
        stream = text.tokens(max(config.seq_lens) * per_length)
        self.passkey = self._spread(lambda n, k: passkey_cases(tokenizer, stream, text.start_id, n,
                                                               config.passkey_depths, k, config.seed),
                                    config.passkey, len(config.passkey_depths))
        self.copy = self._spread(lambda n, k: copy_cases(tokenizer, stream, text.start_id, n, k, config.copy_span,
                                                         config.seed), config.copy, 1)
        if config.ruler and ruler_samples is None:
            ruler_samples = ruler.ruler_samples(tokenizer, config.ruler, config.seq_lens, config.ruler_samples,
                                                config.seed, text.start_id)
        self.ruler = ruler_samples or {}
        self.stop_ids = ruler.stop_token_ids(model, tokenizer)
        self._observed: dict[tuple[str, str, int], tuple[dict, dict | None]] = {}

    def _spread(self, make, total: int, multiple: int) -> dict[int, list]:
        """``total`` cases over the lengths, each length's count rounded up to a multiple of ``multiple``."""
        if not total:
            return {}
        per = math.ceil(total / len(self.config.seq_lens) / multiple) * multiple
        return {n: make(n, per) for n in self.config.seq_lens}

    # ------------------------------------------------------------------------------------------------ forwards

    def _forward_nll(self, ids: torch.Tensor) -> torch.Tensor:
        """Next-token NLL ``[B, N - 1]`` (float32) of ``ids``, the LM head applied chunk by chunk."""
        with torch.no_grad():
            hidden = self.model.base_model(input_ids=ids.to(self.device), use_cache=False).last_hidden_state
            head = self.model.get_output_embeddings()
            out = []
            for start in range(0, ids.shape[1] - 1, _LOGIT_CHUNK):
                stop = min(ids.shape[1] - 1, start + _LOGIT_CHUNK)
                logits = head(hidden[:, start:stop]).float()
                target = ids[:, start + 1:stop + 1].to(self.device)
                out.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none"))
            return torch.cat(out, dim=1)

    def _batches(self, rows: torch.Tensor):
        for i in range(0, len(rows), self.config.batch_size):
            yield rows[i:i + self.config.batch_size]

    def _bar(self, items, desc: str):
        from tqdm.auto import tqdm

        return tqdm(items, desc=desc, disable=not self.progress, leave=False)

    def _perplexity(self, rows: torch.Tensor, recall: bool, label: str) -> dict:
        """PPL, second-half PPL, achieved density (mean and per layer) and (``recall``) per-layer recall beside the
        oracle's."""
        ctx = self.ctx
        nll, density, layer_density, layer_recall, layer_oracle = [], [], {}, {}, {}

        def measure(obs: LayerObservation) -> None:
            if obs.mask is None or obs.mass is None:  # a dense layer keeps all of its mass
                layer_recall.setdefault(obs.layer_idx, []).append(1.0)
                layer_oracle.setdefault(obs.layer_idx, []).append(1.0)
                return
            layer_recall.setdefault(obs.layer_idx, []).append(float(mass_recall(obs.mask, obs.mass)))
            layer_oracle.setdefault(obs.layer_idx, []).append(float(oracle_recall(
                obs.mass, float(block_density(obs.mask)), ctx.sparsity.sink_blocks, ctx.sparsity.local_blocks)))

        sparse = ctx.mode == "sparse"
        with ctx.running(consumer=measure if recall and sparse else None, want_mass=recall and sparse):
            for batch in self._bar(list(self._batches(rows)), f"{label}: perplexity"):
                ctx.clear_step()
                nll.append(self._forward_nll(batch).cpu())
                if sparse:
                    density.append(ctx.mean_density())
                    for layer, value in ctx.densities().items():
                        layer_density.setdefault(layer, []).append(value)
        nll = torch.cat(nll)
        half = nll[:, nll.shape[1] // 2:]
        out = {"tokens": nll.numel(), "ppl": math.exp(float(nll.mean())), "ppl_half": math.exp(float(half.mean())),
               "density": _mean(density) if sparse else 1.0,
               "density_by_layer": [_mean(layer_density[i]) for i in sorted(layer_density)] or None}
        if layer_recall:
            by_layer = [_mean(layer_recall[i]) for i in sorted(layer_recall)]
            out.update(recall=_mean(by_layer), recall_by_layer=by_layer,
                       oracle_recall=_mean([_mean(layer_oracle[i]) for i in sorted(layer_oracle)]))
        return out

    def _decode_density(self, decoded: list[float]) -> None:
        """Adds the achieved decode density of the last generation to ``decoded`` (nothing when decode ran dense or
        took no step)."""
        decode = getattr(self.model, "seer_decode", None)
        if decode is not None and decode.sparsity is not None and decode.density:
            decoded.append(decode.mean_density())

    def _passkey(self, cases: list[PasskeyCase], label: str, decoded: list[float]) -> dict:
        correct, density = 0, []
        for i in self._bar(range(0, len(cases), self.config.batch_size), f"{label}: passkey"):
            chunk = cases[i:i + self.config.batch_size]
            ids = torch.stack([c.input_ids for c in chunk]).to(self.device)
            self.ctx.clear_step()
            answers = self._greedy(ids, PASSKEY_NEW_TOKENS)
            self._decode_density(decoded)
            if self.ctx.mode == "sparse":
                density.append(self.ctx.mean_density())
            for case, answer in zip(chunk, answers):
                text = self.tokenizer.decode(answer, skip_special_tokens=True)
                found = re.search(r"\d+", text)
                correct += int(found is not None and found.group(0) == case.key)
        return {"passkey": correct / len(cases), "passkey_density": _mean(density) if density else 1.0}

    def _greedy(self, ids: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy continuation ``[B, steps]``: a (sparse) prefill, then decode steps over its KV cache (sparse when the
        model's decode gates are on)."""
        with torch.no_grad():
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1)
            tokens = [out.logits[:, -1].argmax(-1)]
            for _ in range(steps - 1):
                out = self.model(input_ids=tokens[-1][:, None], past_key_values=out.past_key_values, use_cache=True)
                tokens.append(out.logits[:, -1].argmax(-1))
        return torch.stack(tokens, dim=1).cpu()

    def _ruler(self, samples: dict[str, list[ruler.RulerSample]], label: str, decoded: list[float]) -> dict:
        """RULER scores (0-100): ``ruler/<task>`` (mean over its samples), ``ruler`` (mean over tasks), the mean
        achieved density of the prefills (``ruler_density``) and each sample's answer (``ruler_answers``: task,
        sample, the generated text, the references and its score); ``batch_size`` samples a prefill (left-padded).
        Decode densities go to ``decoded``."""
        out, density, answered = {}, [], []
        for task, cases in samples.items():
            scores = []
            batches = [cases[i:i + self.config.batch_size] for i in range(0, len(cases), self.config.batch_size)]
            for batch in self._bar(batches, f"{label}: ruler {task}"):
                self.ctx.density.clear()
                answers = ruler.greedy_answers(self.model, [case.input_ids for case in batch],
                                               max(case.max_new_tokens for case in batch), self.stop_ids)
                self._decode_density(decoded)
                if self.ctx.mode == "sparse":
                    density.append(self.ctx.mean_density())
                for case, answer in zip(batch, answers):
                    text = self.tokenizer.decode(answer[:case.max_new_tokens], skip_special_tokens=True)
                    scores.append(ruler.score(task, text, case.answers))
                    answered.append({"task": task, "sample": case.index, "answer": text,
                                     "references": case.answers, "score": scores[-1]})
            out[f"ruler/{task}"] = _mean(scores)
        out.update(ruler=_mean(out.values()), ruler_density=_mean(density) if density else 1.0,
                   ruler_answers=answered)
        return out

    def _copy(self, cases: list[CopyCase], label: str) -> dict:
        hits, nlls = [], []
        for i in self._bar(range(0, len(cases), self.config.batch_size), f"{label}: copy"):
            chunk = cases[i:i + self.config.batch_size]
            ids = torch.stack([c.input_ids for c in chunk])
            pos = chunk[0].repeat_pos  # the same for every case of one length
            with torch.no_grad():
                hidden = self.model.base_model(input_ids=ids.to(self.device), use_cache=False).last_hidden_state
                logits = self.model.get_output_embeddings()(hidden[:, pos - 1:-1]).float()
            target = ids[:, pos:].to(self.device)
            hits.append((logits.argmax(-1) == target).float().mean(1).cpu())
            nlls.append(torch.nn.functional.cross_entropy(logits.transpose(1, 2), target, reduction="none")
                        .mean(1).cpu())
        return {"copy": float(torch.cat(hits).mean()), "copy_nll": float(torch.cat(nlls).mean())}

    def _timing(self, n: int) -> dict:
        """Milliseconds of one prefill of the first evaluated window: whole forward, and summed over layers the
        selection (scores + budget + index... up to the mask) and the attention kernel (sparse mode), from CUDA
        events after a warm-up."""
        if self.device.type != "cuda" or not self.config.timing:
            return {}
        ids = self.windows[n][self.config.calibration_windows:][:1].to(self.device)
        sparse = self.ctx.mode == "sparse"

        def forward():
            with torch.no_grad():
                self.model.base_model(input_ids=ids, use_cache=False)

        forward()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with self.ctx.running(timer=[] if sparse else None) as ctx:
            start.record()
            forward()
            end.record()
            torch.cuda.synchronize()
            out = {"prefill_ms": start.elapsed_time(end)}
            if sparse:
                out["select_ms"] = sum(e[0].elapsed_time(e[1]) for e in ctx.timer)
                out["attention_ms"] = sum(e[1].elapsed_time(e[2]) for e in ctx.timer)
        return out

    def _measure(self, n: int, rows: torch.Tensor, label: str) -> dict:
        c = self.config
        out: dict[str, Any] = {"seq_len": n}
        decoded: list[float] = []
        if c.perplexity or c.recall:
            out.update(self._perplexity(rows, c.recall, f"{label} {n}"))
        if self.passkey:
            out.update(self._passkey(self.passkey[n], f"{label} {n}", decoded))
        if self.copy:
            out.update(self._copy(self.copy[n], f"{label} {n}"))
        if self.ruler:
            out.update(self._ruler(self.ruler[n], f"{label} {n}", decoded))
        if decoded:
            out["decode_density"] = _mean(decoded)
        out.update(self._timing(n))
        return out

    # ------------------------------------------------------------------------------------------------ public

    def dense(self) -> dict[int, dict]:
        """Dense measures per length (``ppl``, ``passkey``, ``copy``, ... of the model with full attention)."""
        path = self._dense_cache_path()
        if path is not None and path.is_file():
            return {int(k): v for k, v in json.loads(path.read_text()).items()}
        with self.ctx.running("dense"), self._decoding(None, None):
            result = {n: self._measure(n, self.windows[n][self.config.calibration_windows:], "dense")
                      for n in self.config.seq_lens}
        if path is not None:
            atomic_write_text(path, json.dumps({str(k): v for k, v in result.items()}, indent=1))
        return result

    def _decoding(self, decode: DecodeSparsityConfig | None, threshold: float | None):
        """The decode steps inside the block: sparse with budget ``decode`` (``threshold``: its calibrated knob), dense
        with None."""
        context = getattr(self.model, "seer_decode", None)
        if context is None:
            if decode is not None:
                raise ValueError(f"decode budget {decode.describe()}: the model has no decode gates "
                                 f"(seer.model.decode_gate_io.load_decode_gates)")
            return contextlib.nullcontext()
        return context.running(decode, self.ctx.kernel, threshold)

    def _dense_cache_path(self) -> Path | None:
        if self.cache_dir is None or not self.config.dense_cache:
            return None
        settings = {k: v for k, v in vars(self.config).items() if k not in ("timing", "dense_cache", "batch_size")}
        if self.config.ruler:  # the task data comes with the package
            settings["ruler_data"] = ruler.data_version()
        else:  # keys of runs from before RULER stay valid
            del settings["ruler"], settings["ruler_samples"]
        key = json.dumps([self.model_name, self.text.fingerprint, settings, self.device.type, 1], sort_keys=True)
        return self.cache_dir / f"dense-{hashlib.sha256(key.encode()).hexdigest()[:20]}.json"

    def observe(self, selector, seq_len: int, want_mass: bool, layer_selectors: dict | None = None,
                under: Calibration | None = None) -> tuple[dict[int, torch.Tensor], dict | None]:
        """Block scores (and, with ``want_mass``, true block masses) of every layer on the calibration windows of
        ``seq_len``, the model running dense (or, ``under`` a calibration, sparse with its budget and knobs),
        ``layer_selectors`` scoring their layers: ``({layer: [rows, H, nb, nb]}, {layer: ...} or None)``. The dense
        observation is cached per scorer, layer selectors and length."""
        key = (repr(selector), repr(sorted((layer_selectors or {}).items())), seq_len)
        have = self._observed.get(key) if under is None else None
        if have is not None and (have[1] is not None or not want_mass):
            return have
        rows = self.windows[seq_len][:self.config.calibration_windows]
        if not len(rows):
            raise ValueError("a calibrated budget needs eval.calibration_windows >= 1")
        sparse = {} if under is None else dict(sparse=True, sparsity=under.sparsity, calibration=under)
        with self.ctx.observing(want_mass, selector=selector, layer_selectors=layer_selectors, **sparse) as observed:
            for batch in self._bar(list(self._batches(rows)), f"calibration {seq_len}"
                                   + ("" if under is None else " (sparse)")):
                with torch.no_grad():
                    self.model.base_model(input_ids=batch.to(self.device), use_cache=False)
        got = (observed.scores(), observed.masses() if want_mass else None)
        if under is None:
            self._observed[key] = got
        return got

    def forget(self, selector) -> None:
        """Drops the observations cached for ``selector`` (None: the gates, after loading other gate weights), with
        any layer selectors."""
        self._observed = {k: v for k, v in self._observed.items() if k[0] != repr(selector)}

    def calibrate(self, selector, sparsity: SparsityConfig, seq_len: int,
                  layer_selectors: dict | None = None) -> Calibration:
        """The calibration of ``sparsity`` for ``selector`` (with ``layer_selectors`` scoring their layers) on the
        calibration windows of ``seq_len``: fitted on the dense model's scores, then re-fitted on the sparse model's
        ``sparsity.calibration_rounds`` times (each round one sparse forward over the windows)."""
        def observe(under: Calibration | None):
            return self.observe(selector, seq_len, sparsity.allocation == "oracle", layer_selectors, under)

        return calibrate_in_rounds(observe, sparsity, scorer_name(selector, self.ctx.gate_config, layer_selectors),
                                   seq_len)

    def _calibration(self, selector, sparsity: SparsityConfig, seq_len: int, layer_selectors: dict | None,
                     given: Calibration | None) -> Calibration | None:
        """The calibration a sparse run of ``sparsity`` uses at ``seq_len``: None for a budget that needs none, else
        ``given`` or a fresh one (:meth:`calibrate`)."""
        if not sparsity.calibrated:
            return None
        return given or self.calibrate(selector, sparsity, seq_len, layer_selectors)

    def _sparse(self, selector, sparsity: SparsityConfig, calibration: Calibration | None,
                layer_selectors: dict | None):
        """The model running sparse with this scorer, budget and calibration (the context of every sparse measure)."""
        return self.ctx.running("sparse", selector=selector, layer_selectors=layer_selectors, sparsity=sparsity,
                                calibration=calibration)

    def calibration_ppl(self, selector, sparsity: SparsityConfig, seq_len: int,
                        calibration: Calibration | None = None, layer_selectors: dict | None = None) -> dict:
        """Perplexity of ``selector`` (None: the gates; ``layer_selectors`` scoring their layers) with budget
        ``sparsity`` on the **calibration windows** of ``seq_len``, not the evaluated ones: ``ppl``, ``ppl_half``,
        ``tokens``, the achieved ``density`` and ``density_by_layer``, and the ``calibrated_density`` (None for a
        budget that needs no calibration). ``calibration`` is used as given, else made here (:meth:`calibrate`, on
        these same windows).

        This measure is in-sample for the budget (the windows its threshold was calibrated on) and out-of-sample for
        the evaluated windows of :meth:`evaluate`: a choice made by comparing it (e.g. which scorer a group of layers
        gets) has not looked at the windows it is then evaluated on. Costs one calibration (an observation, dense, of
        the calibration windows unless cached) and one sparse forward over the calibration windows."""
        rows = self.windows[seq_len][:self.config.calibration_windows]
        if not len(rows):
            raise ValueError("a calibration-window perplexity needs eval.calibration_windows >= 1")
        calibration = self._calibration(selector, sparsity, seq_len, layer_selectors, calibration)
        name = scorer_name(selector, self.ctx.gate_config, layer_selectors)
        with self._sparse(selector, sparsity, calibration, layer_selectors):
            out = self._perplexity(rows, False, f"{name} {sparsity.method} {seq_len} calibration windows")
        return {**out, "calibrated_density": calibration.density if calibration else None}

    def evaluate(self, selector, sparsity: SparsityConfig, dense: dict[int, dict] | None = None,
                 calibrations: dict[int, Calibration] | None = None, decode: DecodeSparsityConfig | None = None,
                 decode_threshold: float | None = None, layer_selectors: dict | None = None) -> list[dict]:
        """One row of metrics per length for ``selector`` (None: the gates; ``layer_selectors``, ``{layer:
        selector}``, scoring their layers instead) with budget ``sparsity``, beside
        ``dense`` (measured if not given). ``calibrations`` (per length) are used as given instead of calibrating
        (e.g. the ones stored with the gates). ``decode``: the decode budget of the model's decode gates for the
        generated measures (``decode_threshold``: the calibrated threshold of a calibrated one); None: dense decode."""
        dense = self.dense() if dense is None else dense
        name = scorer_name(selector, self.ctx.gate_config, layer_selectors)
        rows = []
        for n in self.config.seq_lens:
            calibration = self._calibration(selector, sparsity, n, layer_selectors, (calibrations or {}).get(n))
            with self._sparse(selector, sparsity, calibration, layer_selectors), \
                    self._decoding(decode, decode_threshold):
                got = self._measure(n, self.windows[n][self.config.calibration_windows:],
                                    f"{name} {sparsity.method}")
            rows.append(self._row(name, sparsity, calibration, got, dense[n], decode))
        return rows

    def _row(self, name: str, sparsity: SparsityConfig, calibration: Calibration | None, got: dict, dense: dict,
             decode: DecodeSparsityConfig | None) -> dict:
        knobs = [v for values in calibration.knobs.values() for v in values] if calibration else None
        own = {"topk": sparsity.target_density, "threshold": sparsity.threshold, "topp": sparsity.p,
               "dense": None}[sparsity.method]
        row = {key: None for key in ROW_KEYS}
        row.update(got)
        row.update(
            selector=name, sparsity=sparsity.describe(),
            method=sparsity.method,
            allocation=sparsity.allocation if sparsity.calibrated else None, target_density=sparsity.target_density,
            knob=_mean(knobs) if knobs else own, knob_min=min(knobs) if knobs else own,
            knob_max=max(knobs) if knobs else own, calibrated_density=calibration.density if calibration else None,
            ppl_dense=dense.get("ppl"), ppl_half_dense=dense.get("ppl_half"), passkey_dense=dense.get("passkey"),
            copy_dense=dense.get("copy"), copy_nll_dense=dense.get("copy_nll"),
            dense_prefill_ms=dense.get("prefill_ms"), decode=decode.describe() if decode else None)
        row.update({f"{key}_dense": value for key, value in dense.items()
                    if key == "ruler" or key.startswith("ruler/")})
        dense_answers = {(a["task"], a["sample"]): a for a in dense.get("ruler_answers") or []}
        for answer in row.get("ruler_answers") or []:
            same = dense_answers.get((answer["task"], answer["sample"]))
            if same is not None:
                answer.update(dense_answer=same["answer"], dense_score=same["score"])
        if row["ppl"] is not None and row["ppl_dense"]:
            row["ppl_increase"] = row["ppl"] / row["ppl_dense"] - 1.0
        return row
