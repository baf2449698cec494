#!/usr/bin/env bash
# Here, after a GPU call ran `GATES=1 bash experiments/gpu/collect.sh`: turns the gate parts it brought back (DIR holds
# gates.tgz.0 .. and gates.sha256) into two carried folders, .assets/qwen05-gates-a and -b (each under the 64 MiB a
# call carries with the working tree), whose stage.sh, run by setup.sh there, joins the parts once both came and
# unpacks the gates where next.sh reads them (/root/w/work/train_base/gates). Usage: stage_gates.sh DIR
set -eu
src=${1:?usage: stage_gates.sh DIR (the folder of gates.tgz.* and gates.sha256)}
parts=("$src"/gates.tgz.*)
[ -e "${parts[0]}" ] && [ -e "$src/gates.sha256" ] || { echo "no gates.tgz.* or gates.sha256 in $src"; exit 1; }
n=${#parts[@]}
rm -rf .assets/qwen05-gates-a .assets/qwen05-gates-b
mkdir -p .assets/qwen05-gates-a .assets/qwen05-gates-b
for i in "${!parts[@]}"; do
  if [ "$i" -lt $(( (n + 1) / 2 )) ]; then cp "${parts[$i]}" .assets/qwen05-gates-a/; else cp "${parts[$i]}" .assets/qwen05-gates-b/; fi
done
for d in .assets/qwen05-gates-a .assets/qwen05-gates-b; do
  cp "$src/gates.sha256" "$d/"
  cat > "$d/stage.sh" <<STAGE
#!/usr/bin/env bash
# copies these gate parts to /root/w/gate-parts; once all $n are there, joins, checks and unpacks them
set -e; here=\$(cd "\$(dirname "\$0")" && pwd)
mkdir -p /root/w/gate-parts /root/w/work/train_base; cp "\$here"/gates.tgz.* /root/w/gate-parts/
if [ "\$(ls /root/w/gate-parts | wc -l)" = $n ]; then
  cat /root/w/gate-parts/gates.tgz.* > /root/w/gates.tgz && rm -rf /root/w/gate-parts
  (cd /root/w && sha256sum -c "\$here/gates.sha256") && tar xzf /root/w/gates.tgz -C /root/w/work/train_base && echo "gates ready: /root/w/work/train_base/gates"
else echo "staged \$(ls /root/w/gate-parts | wc -l) of $n gate parts"; fi
STAGE
done
du -sh .assets/qwen05-gates-a .assets/qwen05-gates-b
