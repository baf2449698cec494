#!/usr/bin/env bash
# Which query rows the block masses average over, under a threshold at density 0.1 (Qwen2.5-Coder-0.5B at 8k on a CPU,
# one window of Emma and of held-out stdlib code; docs/results/qwen/row_sampling_8k_cpu.md). Every selection reads the
# exact attention of its layer's Q and K (no gates): the oracle (every row), the rerank over every block (top_p 1.0)
# with 16 rows spread evenly, 16 rows drawn at random (experiments/rerank_rows.py), 1 row (the last), the rerank over
# vertical-slash's top-p 0.99 with 64 and 16 rows, the oracle pooled by a power mean over the rows or with each block's
# first row weighted more (experiments/oracle_pool.py), and the oracle and the 16-row rerank with the block left of
# the diagonal forced (sparsity.local_blocks=1). About 8 minutes a run on 2 cores.
#   bash experiments/row_sampling_8k_cpu.sh MODEL_DIR GGUF_FILE OUT_DIR [RUN ...]   (no RUN: all of them)
set -eu
model_dir=$1 gguf=$2 out=$3; shift 3
py=${PYTHON:-python3}
run() {  # TEXT NAME [ENV=VALUE ...] [SCRIPT] -- OVERRIDES...
  local text=$1 name=$2; shift 2
  local launch=(env)
  while [ "$1" != -- ]; do launch+=("$1"); shift; done; shift
  case " ${RUNS} " in *" $text/$name "*) ;; *) return 0 ;; esac
  local data=()
  [ "$text" = novel ] && data=(data=text_files "data.corpus.paths=[$novel]" eval.split=all)
  case "${launch[-1]}" in *.py) ;; *) launch+=("$py") ;; esac
  "${launch[@]}" -m seer.eval model=qwen2_5_coder_0_5b model.package=null "model.name_or_path=$model_dir" \
    "model.gguf_file=$gguf" 'eval.seq_lens=[8192]' eval.windows=1 eval.calibration_windows=1 eval.passkey=0 eval.copy=0 \
    'eval.ruler=[]' eval.batch_size=1 eval.timing=false eval.recall=false sparsity=threshold sparsity.target_density=0.1 \
    logger=none save_calibration=false "${data[@]}" "$@" "hydra.run.dir=$out/$text/$name"
}
novel=${NOVEL:-.assets/austen/emma.txt}
all="novel/oracle novel/r16_p1 novel/r64_p099 novel/r16_p099 novel/pool_max novel/pool_2 novel/r16_seed1 novel/r16_seed2
     novel/r16_seed3 novel/r1_p1 novel/oracle_local1 novel/r16_p1_local1 novel/pool_first4
     novel/pool_first16 code/oracle code/r16_p1 code/pool_2 code/pool_first4"
RUNS=$(echo ${*:-$all})
rr=(selector=reranked selector.top_p=1.0)
run novel oracle -- selector=oracle
run novel r16_p1 -- "${rr[@]}" selector.rows=16
run novel r64_p099 -- selector=reranked selector.rows=64 selector.top_p=0.99
run novel r16_p099 -- selector=reranked selector.rows=16 selector.top_p=0.99
run novel pool_max SEER_ORACLE_POOL=max "$py" experiments/oracle_pool.py -- selector=oracle
run novel pool_2 SEER_ORACLE_POOL=2 "$py" experiments/oracle_pool.py -- selector=oracle
for w in 4 16; do
  run novel pool_first$w SEER_ORACLE_POOL=first:$w "$py" experiments/oracle_pool.py -- selector=oracle
done
for seed in 1 2 3; do
  run novel r16_seed$seed SEER_RERANK_ROWS_SEED=$seed "$py" experiments/rerank_rows.py -- "${rr[@]}" selector.rows=16
done
run novel r1_p1 -- "${rr[@]}" selector.rows=1
run novel oracle_local1 -- selector=oracle sparsity.local_blocks=1
run novel r16_p1_local1 -- "${rr[@]}" selector.rows=16 sparsity.local_blocks=1
run code oracle -- selector=oracle
run code r16_p1 -- "${rr[@]}" selector.rows=16
run code pool_2 SEER_ORACLE_POOL=2 "$py" experiments/oracle_pool.py -- selector=oracle
run code pool_first4 SEER_ORACLE_POOL=first:4 "$py" experiments/oracle_pool.py -- selector=oracle
