#!/usr/bin/env bash
# Why does a row-capped threshold lose RULER's variable tracking (docs/results/qwen/capped.md)? Qwen2.5-Coder-0.5B at
# 8k on a CPU: the oracle under one threshold (the knob the capped calibration found, 0.035949, unless an override
# sets another), RULER vt x 2 samples, no perplexity; each run is one seer.eval command writing OUT/NAME (metrics.json,
# ruler_answers.jsonl with each answer beside dense's). About 8 minutes a run on 2 cores (the dense pass is cached after
# the first).
#   bash experiments/vt_cap_8k_cpu.sh MODEL_DIR GGUF_FILE OUT_DIR NAME [SEER.EVAL OVERRIDE ...]
# EXTRA="OVERRIDE ..." adds overrides to every run (e.g. model.gguf_cache_dir=..., paths.cache_dir=...). The runs of
# docs/results/qwen/vt_cap_8k_cpu.md:
#   uncapped     sparsity.target_density=0.1 sparsity.max_row_share=1.0   (calibrated: the uncapped knob)
#   capped       (no override: cap 0.15 at the capped knob)
#   last4        sparsity.dense_last_rows=4
#   floor16      sparsity.cap_min_blocks=16
#   floor64      sparsity.cap_min_blocks=64
#   late_dense   'sparsity.dense_layers=[12,13,14,15,16,17,18,19,20,21,22,23]'
#   early_dense  'sparsity.dense_layers=[0,1,2,3,4,5,6,7,8,9,10,11]'
set -eu
model_dir=$1 gguf=$2 out=$3 name=$4; shift 4
py=${PYTHON:-python3}
novel=${NOVEL:-.assets/austen/emma.txt}
"$py" -m seer.eval model=qwen2_5_coder_0_5b model.package=null "model.name_or_path=$model_dir" "model.gguf_file=$gguf" \
  data=text_files "data.corpus.paths=[$novel]" eval.split=all 'eval.seq_lens=[8192]' eval.windows=1 \
  eval.calibration_windows=1 eval.passkey=0 eval.copy=0 'eval.ruler=[vt]' eval.ruler_samples=2 eval.batch_size=1 \
  eval.timing=false eval.recall=false eval.perplexity=false logger=none save_calibration=false selector=oracle \
  sparsity.target_density=null sparsity.threshold=0.035949 sparsity.max_row_share=0.15 ${EXTRA:-} "$@" \
  "hydra.run.dir=$out/$name"
