#!/usr/bin/env bash
# On the GPU machine, first thing in every call (README.md beside this): installs the carried wheels into /tmp/site
# once, stages every carried model or gate part (.assets/*/stage.sh), and prints what the machine holds.
set -u
if [ -d .whl ] && [ ! -e /tmp/site/.seer-wheels ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && touch /tmp/site/.seer-wheels
fi
for part in .assets/*/stage.sh; do
  [ -e "$part" ] && bash "$part"
done
echo "models: $(ls /root/models 2>/dev/null | tr '\n' ' ')"
echo "jobs: $(ls /root/w/logs 2>/dev/null | tr '\n' ' ')"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
