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
# with GATES=1, the trained gates too, so that a later session can evaluate them without training again: split into
# parts of 15 MiB (a file over 16 MiB does not come back) beside their sha256; here, experiments/gpu/stage_gates.sh
# turns them into carried parts (README.md)
if [ -n "${GATES:-}" ] && [ -d "$w/work/train_base/gates" ]; then
  tar czf "$w/gates.tgz" -C "$w/work/train_base" gates
  (cd "$w" && sha256sum gates.tgz) > "$OUT/gates.sha256"
  split -b 15m -d -a 1 "$w/gates.tgz" "$OUT/gates.tgz."
  ls -la "$OUT"/gates.*
fi
