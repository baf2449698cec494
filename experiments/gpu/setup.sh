#!/usr/bin/env bash
# On the GPU machine, first thing in every call (README.md beside this): installs the carried wheels into /tmp/site
# once, stages every carried model or gate part (.assets/*/stage.sh) not staged before, and prints what the machine
# holds.
set -u
if [ -d .whl ] && [ ! -e /tmp/site/.seer-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.seer-wheels
fi
# each part once: carried folders stay in the machine's copy of the tree between calls, and staging a part again would
# join its model again, over the file that running jobs have mapped (they die of SIGBUS)
mkdir -p /root/w/staged
for part in .assets/*/stage.sh; do
  name=$(basename "$(dirname "$part")")
  [ -e "$part" ] && [ ! -e "/root/w/staged/$name" ] && bash "$part" && touch "/root/w/staged/$name"
done
echo "models: $(ls /root/models 2>/dev/null | tr '\n' ' ')"
echo "jobs: $(ls /root/w/logs 2>/dev/null | tr '\n' ' ')"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
