"""How far a calibrated budget lands from its target on its own calibration windows, after 0..N calibration rounds.

A calibrated knob is fitted on block scores observed with the model running dense; the sparse model's later layers
see the output of the sparse layers before them and score otherwise, so on the very windows it was fitted on the
knob keeps another density. ``sparsity.calibration_rounds`` re-fits it on the scores of the model running sparse.
This script calibrates with 0, 1, ..., ``--rounds`` rounds and, for each, runs the model sparse over the calibration
windows (:meth:`seer.evaluation.harness.Evaluator.calibration_ppl`) and prints the density the fit predicted, the
density reached and the perplexity, per layer on request. The arguments after the options are ``seer.eval``
overrides (model, selector, budget, ``eval.seq_lens`` with one length, ``eval.calibration_windows``)::

    python experiments/calibration_rounds.py --rounds 3 model=qwen2_5_coder_0_5b model.package=null \\
      model.name_or_path=<folder of qwen05.gguf> model.gguf_file=qwen05.gguf 'eval.seq_lens=[2048]' \\
      eval.calibration_windows=1 eval.windows=1 selector=oracle sparsity=threshold sparsity.target_density=0.2 \\
      sparsity.max_row_share=0.3 data=text_files 'data.corpus.paths=[.assets/austen/emma.txt]' eval.split=all

Measured (docs/results/prefix_ppl.md, "The overshoot, and calibration in rounds").
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from seer import eval as seer_eval
from seer.config import compose
from seer.evaluation.harness import Evaluator
from seer.model.attention import prepare_model
from seer.model.loading import load_causal_lm, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2, help="the most calibration rounds measured (0 .. this)")
    ap.add_argument("--by-layer", action="store_true", help="print each layer's density too")
    ap.add_argument("overrides", nargs="*", help="seer.eval overrides")
    args = ap.parse_args()
    if args.rounds < 0:
        raise SystemExit(f"--rounds {args.rounds}: give a count >= 0")
    cfg = compose([*args.overrides, "logger=none"], config_name="eval")
    model_cfg, sparsity, evaluation, selector, corpus = seer_eval._checked(cfg)
    if not sparsity.calibrated or selector is None or len(evaluation.seq_lens) != 1:
        raise SystemExit(f"give a training-free selector, a calibrated budget (got {sparsity.describe()}) and one "
                         f"length (got eval.seq_lens={evaluation.seq_lens})")
    tokenizer = load_tokenizer(model_cfg)
    text = seer_eval._held_out_text(corpus, tokenizer, evaluation, float(cfg.data.get("val_fraction", 0.05)))
    model = load_causal_lm(model_cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    prepare_model(model, cfg.block_size)
    evaluator = Evaluator(model, tokenizer, text, evaluation, kernel="triton" if torch.cuda.is_available()
                          else "reference")
    n = evaluation.seq_lens[0]
    for rounds in range(args.rounds + 1):
        budget = dataclasses.replace(sparsity, calibration_rounds=rounds)
        got = evaluator.calibration_ppl(selector, budget, n)
        row = {"rounds": rounds, "calibrated_density": got["calibrated_density"], "density": got["density"],
               "ppl": got["ppl"]}
        if args.by_layer:
            row["density_by_layer"] = [round(d, 4) for d in got["density_by_layer"]]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
