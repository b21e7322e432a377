#!/usr/bin/env bash
# flywheel: the whole Codex + InstructGPT chain for one preset, ending in out/<preset>/results.json
# (with 95% intervals and paired comparisons) and out/<preset>/figures/.
#   bash run.sh          # tiny: CPU, ~15-25 minutes on 2 cores
#   bash run.sh small    # one GPU
set -euo pipefail
cd "$(dirname "$0")"
PRESET=${1:-tiny}
case $PRESET in tiny|small) ;; *) echo "usage: bash run.sh [tiny|small]" >&2; exit 2;; esac
OUT=out/$PRESET
# glibc: keep big freed blocks for reuse instead of returning them to the OS; fresh pages are what
# makes CPU training slow here (logits tensors are allocated every step).
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
# OpenMP threads sleep instead of spinning while they wait: with anything else running on a small
# CPU, spinning threads made every stage several times slower here.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
mkdir -p "$OUT"
rm -f "$OUT/results.json"
python -c "import common, sys; common.update_results(sys.argv[1], {'preset': sys.argv[2]})" "$OUT" "$PRESET"
T0=$(date +%s)

stage() {  # stage KEY COMMAND...: run COMMAND, add its wall time to results.json's seconds.KEY
  local key=$1; shift
  echo "=== [$key] $*"
  local t=$(date +%s)
  "$@"
  python - "$OUT" "$key" "$(( $(date +%s) - t ))" <<'PY'
import json, sys, common
from pathlib import Path
out, key, dt = sys.argv[1], sys.argv[2], float(sys.argv[3])
p = Path(out) / "results.json"
seconds = json.loads(p.read_text()).get("seconds", {}) if p.exists() else {}
common.update_results(out, {"seconds": {key: seconds.get(key, 0) + dt}})
PY
}

VOCAB=$(python data/code.py --preset "$PRESET" --print_vocab_size)
EVAL="--problems $OUT/tasks/test.jsonl"

# 1. corpus, tokenizer, tokenized corpus (Codex §3.1-3.2)
stage tokenizer python data/code.py --preset "$PRESET"
stage tokenizer python tokenizer.py --input "$OUT/code/train" --vocab_size "$VOCAB" --out "$OUT/tokenizer.json" \
    --eval "$OUT/code/val" --report "$OUT/tokenizer_report.json"
stage tokenizer python data/code.py --preset "$PRESET" --tokenize
python - "$OUT" <<'PY'
import json, sys, common
from pathlib import Path
report = json.loads((Path(sys.argv[1]) / "tokenizer_report.json").read_text())
common.update_results(sys.argv[1], {"tokenizer": {k: report[k] for k in ("vocab_size", "bytes_per_token", "bytes_per_token_no_ws")}})
PY
# 2. the programming problems (HumanEval format) and the base model
stage evaluate python data/tasks.py --preset "$PRESET"
stage pretrain python pretrain.py --preset "$PRESET"
stage evaluate python evaluate.py --preset "$PRESET" --ckpt "$OUT/base.pt" $EVAL --model_name base
# 3. InstructGPT step 1: supervised fine-tuning on demonstrations
stage sft python sft.py --preset "$PRESET"
# 4. step 2: comparisons labelled by execution, reward model; then SFT's pass@k and best-of-n by RM score
stage reward python reward.py --preset "$PRESET"
stage evaluate python evaluate.py --preset "$PRESET" --ckpt "$OUT/sft.pt" $EVAL --model_name sft --rm "$OUT/rm.pt" \
    --sweep=0.2,0.4,0.6,0.8,1.0   # + Codex Figure 5: SFT's pass@k at each temperature (evaluate.py sweep_n)
# 5. step 3: PPO against the reward model, without and with pretraining-gradient mixing
stage ppo python ppo.py --preset "$PRESET" --ptx_coef=0 --run_name=ppo
stage evaluate python evaluate.py --preset "$PRESET" --ckpt "$OUT/ppo.pt" $EVAL --model_name ppo
stage ppo python ppo.py --preset "$PRESET" --run_name=ppo_ptx
stage evaluate python evaluate.py --preset "$PRESET" --ckpt "$OUT/ppo_ptx.pt" $EVAL --model_name ppo_ptx
# 6. evidence: 95% intervals, paired differences (ppo - sft, ...), best-of-n; figures (with matplotlib)
stage evaluate python evaluate.py --preset "$PRESET" --compare --figures

python - "$OUT" "$(( $(date +%s) - T0 ))" <<'PY'
import json, sys, common
from pathlib import Path
common.update_results(sys.argv[1], {"seconds": {"total": float(sys.argv[2])}})
print(json.dumps(json.loads((Path(sys.argv[1]) / "results.json").read_text()), indent=2))
PY
python evaluate.py --table "$OUT/results.json"
