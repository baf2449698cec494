"""Quality of a block selection on a model: perplexity, attention recall, passkey and copy retrieval, RULER, timing.

* :mod:`seer.evaluation.config` - :class:`EvalConfig`, which measures run and on what (Hydra group ``eval``).
* :mod:`seer.evaluation.data` - held-out text cut into windows that start like a document.
* :mod:`seer.evaluation.tasks` - seeded passkey and copy cases built from held-out text.
* :mod:`seer.evaluation.ruler` - RULER's 13 tasks generated offline with the model's tokenizer, and RULER's scoring.
* :mod:`seer.evaluation.harness` - :class:`Evaluator`: one model, its windows and cases, any selector x budget, dense
  measured once beside.
"""
