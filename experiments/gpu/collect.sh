#!/usr/bin/env bash
# On the GPU machine: packs the agenda's tables, rows and logs (not gates or models) into $OUT/r.tgz and prints the
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
# the trained gates, so that a later session can evaluate them without training again (a file over 16 MiB does
# not come back: then only the log says they were trained)
[ -d "$w/work/train_base/gates" ] && tar czf "$OUT/gates.tgz" -C "$w/work/train_base" gates && ls -la "$OUT/gates.tgz"
