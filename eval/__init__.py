"""vLLM evaluation of Hugging Face checkpoints (docs/eval.md): ``evaluate(EvalConfig(...))``,
called under ``if __name__ == "__main__":`` since vLLM starts worker processes."""

from probsft_megatron.eval.runner import EvalConfig, TaskResult, evaluate

__all__ = ["EvalConfig", "TaskResult", "evaluate"]
