#!/usr/bin/env bash
# Is the budgets' gain under dense (docs/results/qwen/capped.md) a temperature's? Qwen2.5-Coder-0.5B at 8k on a CPU,
# one window of Emma and of held-out stdlib code (the windows of docs/results/prefix_ppl.md's 8k rows), the model dense
# (sparsity=dense: the row's PPL is the dense one at that temperature) with every attention layer's logits divided by
# T, or only the rows past 4096 tokens sharpened (log-n scaling; experiments/attention_temperature.py). A run is one
# seer.eval command, its folder OUT/TEXT/NAME; about 4.5 minutes a run on 2 cores.
#   bash experiments/temperature_8k_cpu.sh MODEL_DIR GGUF_FILE OUT_DIR [TEXT/NAME ...]   (no run named: all of them)
# EXTRA="OVERRIDE ..." adds seer.eval overrides to every run (e.g. model.gguf_cache_dir=..., paths.cache_dir=...).
set -eu
model_dir=$1 gguf=$2 out=$3; shift 3
py=${PYTHON:-python3}
novel=${NOVEL:-.assets/austen/emma.txt}
run() {  # TEXT NAME T OVERRIDES...
  local text=$1 name=$2 t=$3; shift 3
  case " ${RUNS} " in *" $text/$name "*) ;; *) return 0 ;; esac
  local data=()
  [ "$text" = novel ] && data=(data=text_files "data.corpus.paths=[$novel]" eval.split=all)
  SEER_ATTN_TEMPERATURE=$t "$py" experiments/attention_temperature.py -m seer.eval model=qwen2_5_coder_0_5b \
    model.package=null "model.name_or_path=$model_dir" "model.gguf_file=$gguf" 'eval.seq_lens=[8192]' eval.windows=1 \
    eval.calibration_windows=1 eval.passkey=0 eval.copy=0 'eval.ruler=[]' eval.batch_size=1 eval.timing=false \
    eval.recall=false eval.dense_cache=false logger=none save_calibration=false "${data[@]}" ${EXTRA:-} "$@" \
    "hydra.run.dir=$out/$text/$name"
}
all=""
for text in novel code; do
  for t in 1.2 1.1 1.05 0.95 0.9; do all="$all $text/dense_t$t"; done
  all="$all $text/dense_logn4096"
done
RUNS=$(echo ${*:-$all})
for text in novel code; do
  for t in 1.2 1.1 1.05 0.95 0.9; do
    run "$text" "dense_t$t" "$t" selector=oracle sparsity=dense
  done
  # only the rows past 4096 tokens sharpened, by ln(n) / ln(4096) (log-n scaling; at most 1.083 at 8k)
  SEER_ATTN_LOGN=4096 run "$text" dense_logn4096 1 selector=oracle sparsity=dense
done
