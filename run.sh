#!/usr/bin/env bash
# flywheel: the whole Codex + InstructGPT chain for one preset, ending in out/<preset>/results.json
# (with 95% intervals and paired comparisons) and out/<preset>/figures/.
#   bash run.sh                      # tiny: CPU, ~22 minutes on the 2-core machine measured (README)
#   bash run.sh small                # one GPU
#   bash run.sh tiny --rounds 2      # iterate comparisons -> reward model -> PPO once more (the flywheel)
#   bash run.sh tiny --resume        # skip the stages that finished, continue an interrupted one
#   bash run.sh small --smoke        # small's code paths and shapes, tiny step counts and data: a CPU, minutes
#   bash run.sh tiny --jobs 1        # one stage at a time (default 2: stages that do not need each other's
#                                    # outputs run side by side, see `lane` below)
# Outputs go to out/<preset> (out/<preset>_smoke with --smoke), or to $FLYWHEEL_OUT when it is set.
set -euo pipefail
cd "$(dirname "$0")"
usage() { echo "usage: bash run.sh [tiny|small] [--rounds N] [--resume] [--smoke] [--jobs 1|2]" >&2; exit 2; }
PRESET=tiny ROUNDS=1 RESUME=0 SMOKE= JOBS=2
while [ $# -gt 0 ]; do
  case $1 in
    tiny|small) PRESET=$1;;
    --rounds) [[ ${2:-} =~ ^[1-9][0-9]*$ ]] || usage; ROUNDS=$2; shift;;
    --rounds=*) ROUNDS=${1#--rounds=}; [[ $ROUNDS =~ ^[1-9][0-9]*$ ]] || usage;;
    --resume) RESUME=1;;
    --smoke) SMOKE=1;;
    --jobs) [[ ${2:-} =~ ^[12]$ ]] || usage; JOBS=$2; shift;;
    --jobs=*) JOBS=${1#--jobs=}; [[ $JOBS =~ ^[12]$ ]] || usage;;
    *) usage;;
  esac
  shift
done
OUT=${FLYWHEEL_OUT:-out/$PRESET${SMOKE:+_smoke}}
# --smoke: every stage keeps the preset's code paths and shapes (vocabulary, block_size,
# max_new_tokens, batch / minibatch divisibility, K, sandbox workers, dtype "auto") with steps and
# data shrunk; the model is 2 layers x 64 wide. A model this small passes no test, so all K samples
# of a prompt would tie: reward.py also ranks each prompt's reference solution (--references).
X_CODE= X_TASKS= X_PRE= X_SFT= X_RM= X_PPO= X_EVAL=
if [ -n "$SMOKE" ]; then
  X_CODE="--max_bytes=1500000"
  X_TASKS="--n_sft=64 --n_rm=8 --n_ppo=32 --n_test=4"
  X_PRE="--n_layer=2 --n_embd=64 --batch_size=4 --max_iters=4 --warmup_iters=2 --eval_interval=2 --eval_iters=2"
  X_SFT="--epochs=1 --holdout=8"
  X_RM="--references"
  X_PPO="--iterations=2 --batch_size=32 --minibatch_size=16 --ptx_batch_size=4 --eval_iters=2"
  X_EVAL="--n=2 --val_iters=2 --sweep_n=2"
fi
RM_PPO=  # PPO against the RM: tiny runs 20 iterations of 128 prompts x 1 sample (step 5)
if [ "$PRESET" = tiny ] && [ -z "$SMOKE" ]; then RM_PPO="--iterations=20 --batch_size=128 --samples_per_prompt=1 --minibatch_size=32"; fi
# glibc: keep big freed blocks for reuse instead of returning them to the OS; fresh pages are what
# makes CPU training slow here (logits tensors are allocated every step).
export MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=68719476736
# OpenMP threads sleep instead of spinning while they wait: with anything else running on a small
# CPU, spinning threads made every stage several times slower here.
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
# --resume: a stage whose stamp out/<preset>/done/<name> exists is skipped; without it, start fresh.
DONE=$OUT/done
mkdir -p "$OUT"
if [ $RESUME = 0 ]; then  # (and no checkpoint of an earlier run that a later --resume could mistake for ours)
  rm -rf "$DONE" "$OUT/results.json" "$OUT"/*.pt
fi
mkdir -p "$DONE"
python -c "import common, sys; common.update_results(sys.argv[1], {'preset': sys.argv[2]})" "$OUT" "$PRESET"
T0=$(date +%s)
add_seconds() {  # add_seconds KEY SECONDS: seconds.KEY += SECONDS in results.json (resumed runs add up)
  python -c "import common, sys; common.add_seconds(sys.argv[1], sys.argv[2], float(sys.argv[3]))" "$OUT" "$1" "$2"
}
add_total() { add_seconds total "$(( $(date +%s) - T0 ))"; }  # seconds.total: this run's wall time

# Lanes: stages that need none of each other's outputs run side by side (--jobs 2, the default). On
# a small CPU one job leaves part of the machine idle (2 threads run a PPO step only ~1.5x faster than
# 1, sampling ~1.8x; the sandbox waits on its subprocesses), and a tiny model leaves a GPU idle too.
# A lane runs in the background with its output in logs/lane_<name>.log; `join_lanes` waits for
# every lane and stops the run if one failed. Each stage still adds its own wall time to seconds.KEY,
# so with lanes the stages' seconds add up to more than seconds.total.
LANES=()
lane() {  # lane NAME COMMAND...: COMMAND (stages) in the background; with --jobs 1, right now
  local name=$1; shift
  if [ "$JOBS" = 1 ]; then "$@"; return; fi
  mkdir -p "$OUT/logs"
  echo "=== lane $name: $* (in the background, output in $OUT/logs/lane_$name.log)"
  set -m  # the lane gets its own process group, so stop_lanes can stop it and its children
  "$@" > "$OUT/logs/lane_$name.log" 2>&1 &
  set +m
  LANES+=("$!:$name")
}
join_lanes() {
  local lane ok=1
  for lane in ${LANES[@]+"${LANES[@]}"}; do
    if wait "${lane%%:*}"; then
      echo "=== lane ${lane#*:}: done"
      grep -E "^(=== |T=|  pick)" "$OUT/logs/lane_${lane#*:}.log" || true  # its stages and results
    else
      echo "error: lane ${lane#*:} failed, see $OUT/logs/lane_${lane#*:}.log:" >&2
      tail -n 5 "$OUT/logs/lane_${lane#*:}.log" >&2
      ok=0
    fi
  done
  LANES=()
  [ $ok = 1 ] || exit 1
}
stop_lanes() {  # (on exit) a lane still running is stopped with its stages
  local lane
  for lane in ${LANES[@]+"${LANES[@]}"}; do kill -TERM -- "-${lane%%:*}" 2>/dev/null || true; done
}
trap 'stop_lanes; add_total' EXIT  # a run that fails or is interrupted counts too: its finished stages' seconds do

stage() {  # stage NAME KEY COMMAND...: run COMMAND unless stamped done; add its wall time to seconds.KEY
  local name=$1 key=$2; shift 2
  if [ -e "$DONE/$name" ]; then echo "=== [$key] $name: done, skipped (--resume)"; return; fi
  echo "=== [$key] $*"
  local t=$(date +%s)
  "$@"
  add_seconds "$key" "$(( $(date +%s) - t ))"
  touch "$DONE/$name"
}
resume_flag() {  # --resume for a script that can continue exactly from its own checkpoint FILE
  if [ $RESUME = 1 ] && [ -e "$1" ]; then echo --resume; fi
}

VOCAB=$(python data/code.py --preset "$PRESET" --print_vocab_size)
EVAL="--problems $OUT/tasks/test.jsonl --out_dir $OUT $X_EVAL"
O="--preset $PRESET --out_dir $OUT"

# 1. corpus, tokenizer, tokenized corpus (Codex §3.1-3.2)
stage corpus tokenizer python data/code.py $O $X_CODE
stage tokenizer tokenizer python tokenizer.py --input "$OUT/code/train" --vocab_size "$VOCAB" \
    --out "$OUT/tokenizer.json" --eval "$OUT/code/val" --report "$OUT/tokenizer_report.json"
stage tokenize tokenizer python data/code.py $O $X_CODE --tokenize
python - "$OUT" <<'PY'
import json, sys, common
from pathlib import Path
report = json.loads((Path(sys.argv[1]) / "tokenizer_report.json").read_text())
common.update_results(sys.argv[1], {"tokenizer": {k: report[k] for k in ("vocab_size", "bytes_per_token", "bytes_per_token_no_ws")}})
PY
# 2. the programming problems (HumanEval format) and the base model
stage tasks evaluate python data/tasks.py $O $X_TASKS
stage pretrain pretrain python pretrain.py $O $X_PRE $(resume_flag "$OUT/base.pt")
lane base stage eval_base evaluate python evaluate.py --preset "$PRESET" --ckpt "$OUT/base.pt" $EVAL --model_name base
# 3. InstructGPT step 1: supervised fine-tuning on demonstrations
stage sft sft python sft.py $O $X_SFT
# 4. step 2: comparisons labelled by execution, reward model; beside it SFT's pass@k and Codex Figure 5
#    (pass@k at each temperature); then SFT's picks by RM score and best-of-n
lane sft stage eval_sft evaluate python evaluate.py --preset "$PRESET" --ckpt "$OUT/sft.pt" $EVAL --model_name sft \
    --ref "$OUT/sft.pt" --sweep=0.2,0.4,0.6,0.8,1.0
stage reward reward python reward.py $O $X_RM
join_lanes
stage rm_picks evaluate python evaluate.py --preset "$PRESET" --rm "$OUT/rm.pt" --model_name sft $EVAL
# 5. step 3: PPO from SFT against the execution reward (the labeler's own score: what any RM trained
#    on it can at best give) beside PPO against the reward model, without and with pretraining-gradient
#    mixing; each evaluated with its KL to SFT on the test prompts
ppo_run() {  # ppo_run NAME [ARGS...]: PPO from sft.pt, then its evaluation
  local name=$1; shift
  stage $name ppo python ppo.py $O $X_PPO "$@" --run_name=$name $(resume_flag "$OUT/$name.pt")
  stage eval_$name evaluate python evaluate.py --preset "$PRESET" --ckpt "$OUT/$name.pt" $EVAL --model_name $name \
      --ref "$OUT/sft.pt"
}
#    The RM runs take a sixth of the exec run's rollouts: what fits beside it (their climb is the RM's
#    limit, not the budget's: docs/RESULTS.md).
lane exec ppo_run ppo_exec --reward=exec --ptx_coef=0
ppo_run ppo --ptx_coef=0 $RM_PPO
ppo_run ppo_ptx $RM_PPO
join_lanes
python -c "import common, sys, json; m = json.load(open(sys.argv[1] + '/results.json'))['models']['ppo']; \
common.update_round(sys.argv[1], 1, {'policy': m})" "$OUT"

# 6. the flywheel (InstructGPT: "steps 2 and 3 can be iterated continuously"): round r samples new
#    comparisons from round r-1's policy, trains a new RM on all comparisons so far, and continues
#    PPO from that policy against it, with the KL penalty still to the SFT model
for (( R = 2; R <= ROUNDS; R++ )); do
  P=$(( R - 1 )); SUF=_r$R; PSUF=$([ $P = 1 ] && echo "" || echo "_r$P")
  CMPS=$OUT/comparisons.jsonl
  for (( Q = 2; Q < R; Q++ )); do CMPS=$CMPS,$OUT/comparisons_r$Q.jsonl; done
  stage reward$SUF reward python reward.py $O $X_RM --round=$R --policy="$OUT/ppo$PSUF.pt" \
      --comparisons "$CMPS" --prev_rm="$OUT/rm$PSUF.pt"
  stage ppo$SUF ppo python ppo.py $O $X_PPO --ptx_coef=0 $RM_PPO --run_name=ppo$SUF --init="$OUT/ppo$PSUF.pt" \
      --ref="$OUT/sft.pt" --rm="$OUT/rm$SUF.pt" $(resume_flag "$OUT/ppo$SUF.pt")
  stage eval_ppo$SUF evaluate python evaluate.py --preset "$PRESET" --ckpt "$OUT/ppo$SUF.pt" $EVAL --model_name ppo$SUF \
      --ref "$OUT/sft.pt"
  python -c "import common, sys, json; m = json.load(open(sys.argv[1] + '/results.json'))['models'][sys.argv[2]]; \
common.update_round(sys.argv[1], int(sys.argv[3]), {'policy': m})" "$OUT" "ppo$SUF" "$R"
done

# 7. evidence: 95% intervals, paired differences (ppo - sft, ppo - SFT sampled cooler at the same KL, ...),
#    best-of-n; the tables and figures (figures with matplotlib)
python evaluate.py --preset "$PRESET" --out_dir "$OUT" --compare
python report.py --figures "$OUT"

trap - EXIT; add_total
python -c "import json, sys; print(json.dumps(json.load(open(sys.argv[1] + '/results.json')), indent=2))" "$OUT"
python report.py --table "$OUT/results.json"
