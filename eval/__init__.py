"""vLLM evaluation of Hugging Face checkpoints: tasks, prompt formats, graders, reports.

Library use (vLLM starts worker processes, so call it under ``if __name__ == "__main__":``)::

    from probsft_megatron.eval import EvalConfig, evaluate
    results = evaluate(EvalConfig(model="ckpt/hf", tasks=["math500"], out="results/"))
"""

from probsft_megatron.eval.runner import EvalConfig, TaskResult, evaluate

__all__ = ["EvalConfig", "TaskResult", "evaluate"]
