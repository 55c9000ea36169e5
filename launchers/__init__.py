"""NeMo-Run experiments: (dataset, model, objective) -> convert, train, export, eval, run
locally with torchrun or on SLURM, and the paper's ablation sweeps (``probsft launch``)."""
