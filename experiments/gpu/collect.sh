#!/usr/bin/env bash
# On the GPU machine: packs the agenda's tables, rows and logs (not models) into $OUT/r.tgz and prints the
# tail of each log, so a call can bring back what has finished so far while the rest runs on.
set -u
w=${SEER_WORK:-/root/w}
[ -d "$w" ] || { echo "nothing under $w yet"; exit 0; }
(cd "$w" && tar czf "$OUT/r.tgz" --exclude='*.safetensors' --exclude='*.gguf' --exclude='work' logs out 2>/dev/null)
for log in "$w"/logs/*.log; do
  [ -e "$log" ] || continue
  echo "== $(basename "$log")"; tail -n 4 "$log" | cut -c1-300
done
ls -la "$OUT"/r.tgz 2>/dev/null
# with GATES=1 (or GATES=qwen05), the Qwen recipe's trained gates too, with GATES=smollm2 SmolLM2's (the folder its
# jobs train into), so that a later session can evaluate them without training again: split into parts of 15 MiB (a
# file over 16 MiB does not come back) beside their sha256 and gates.where (their folder under $w/work); here,
# experiments/gpu/stage_gates.sh turns them into carried parts (README.md)
case "${GATES:-}" in
  "") where= ;;
  smollm2) where=s/train_base ;;
  *) where=train_base ;;
esac
if [ -n "$where" ] && [ -d "$w/work/$where/gates" ]; then
  tar czf "$w/gates.tgz" -C "$w/work/$where" gates
  (cd "$w" && sha256sum gates.tgz) > "$OUT/gates.sha256"
  echo "$where" > "$OUT/gates.where"
  split -b 15m -d -a 1 "$w/gates.tgz" "$OUT/gates.tgz."
  ls -la "$OUT"/gates.*
fi
