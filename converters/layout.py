"""The Megatron model-dir layout, as the converters name it.

The layout lives in :mod:`probsft_megatron.model_dir` (below conversion, training and
probing); this module re-exports it so converter code and users keep the name
``probsft_megatron.converters.layout``.
"""

from probsft_megatron.model_dir import (  # noqa: F401
    FORMAT,
    FORMAT_VERSION,
    HF_DIR,
    MODEL_CONFIG_FILE,
    WEIGHT_FILE_SUFFIXES,
    WEIGHTS_DIR,
    ModelDir,
    begin_staging,
    commit_staging,
    copy_hf_files,
    read_model_config,
    read_model_dir,
    staged,
    staging_path,
    write_model_config,
)
