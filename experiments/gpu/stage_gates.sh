#!/usr/bin/env bash
# Here, after a GPU call ran `GATES=1 bash experiments/gpu/collect.sh` (the Qwen recipe's gates) or `GATES=smollm2 ...`
# (SmolLM2's): turns the gate parts it brought back (DIR holds gates.tgz.0 .., gates.sha256 and gates.where, their
# folder under /root/w/work) into carried folders of at most two parts each (under the 64 MiB a call carries with the
# working tree): .assets/qwen05-gates-a, -b for the Qwen gates, .assets/smollm2-gates-a for SmolLM2's. Their stage.sh,
# run by setup.sh there, joins the parts once all came and unpacks the gates where next.sh reads them
# (/root/w/work/train_base/gates, /root/w/work/s/train_base/gates). Usage: stage_gates.sh DIR
set -eu
src=${1:?usage: stage_gates.sh DIR (the folder of gates.tgz.*, gates.sha256 and gates.where)}
parts=("$src"/gates.tgz.*)
[ -e "${parts[0]}" ] && [ -e "$src/gates.sha256" ] || { echo "no gates.tgz.* or gates.sha256 in $src"; exit 1; }
where=$(cat "$src/gates.where" 2>/dev/null || echo train_base)  # collects before gates.where: the Qwen gates
case "$where" in
  train_base) prefix=qwen05-gates ;;
  s/train_base) prefix=smollm2-gates ;;
  *) echo "gates.where: unknown folder $where"; exit 1 ;;
esac
n=${#parts[@]}
folders=()
rm -rf .assets/"$prefix"-?
for i in "${!parts[@]}"; do
  d=.assets/$prefix-$(printf "\\x$(printf %x $((97 + i / 2)))")  # -a for parts 0-1, -b for 2-3, ...
  mkdir -p "$d" && cp "${parts[$i]}" "$d/"
  [ $((i % 2)) = 0 ] && folders+=("$d")
done
for d in "${folders[@]}"; do
  cp "$src/gates.sha256" "$d/"
  cat > "$d/stage.sh" <<STAGE
#!/usr/bin/env bash
# copies these gate parts to /root/w/$prefix-parts; once all $n are there, joins, checks and unpacks them
set -e; here=\$(cd "\$(dirname "\$0")" && pwd)
mkdir -p /root/w/$prefix-parts /root/w/work/$where; cp "\$here"/gates.tgz.* /root/w/$prefix-parts/
if [ "\$(ls /root/w/$prefix-parts | wc -l)" = $n ]; then
  cat /root/w/$prefix-parts/gates.tgz.* > /root/w/gates.tgz && rm -rf /root/w/$prefix-parts
  (cd /root/w && sha256sum -c "\$here/gates.sha256") && tar xzf /root/w/gates.tgz -C /root/w/work/$where && echo "gates ready: /root/w/work/$where/gates"
else echo "staged \$(ls /root/w/$prefix-parts | wc -l) of $n gate parts"; fi
STAGE
done
du -sh "${folders[@]}"
