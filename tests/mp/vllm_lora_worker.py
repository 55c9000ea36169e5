"""vLLM with a LoRA adapter (``eval.runner.build_llm(max_lora_rank=...)`` and
``lora_request``): greedy tokens of token prompts with and without the adapter, as JSON.

    python tests/mp/vllm_lora_worker.py MODEL ADAPTER OUT.json PROMPT_IDS_JSON
"""

import json
import sys


def main() -> int:
    model, adapter, out, prompts = sys.argv[1:5]
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from probsft_megatron.eval.runner import adapter_rank, build_llm, lora_request

    llm = build_llm(model, dtype="float32", max_model_len=256, max_lora_rank=adapter_rank(adapter))
    params = SamplingParams(max_tokens=8, temperature=0)
    ids = [TokensPrompt(prompt_token_ids=p) for p in json.loads(prompts)]
    base = llm.generate(ids, params, use_tqdm=False)
    tuned = llm.generate(ids, params, use_tqdm=False, lora_request=lora_request(adapter))
    result = {
        "base": [list(o.outputs[0].token_ids) for o in base],
        "lora": [list(o.outputs[0].token_ids) for o in tuned],
    }
    with open(out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
