"""Which pip extras each `probsft` subcommand needs (as ``pyproject.toml`` lists them)."""

from __future__ import annotations

import importlib.util

# extra -> top-level modules it provides (the import names, not the pip names)
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "train": tuple(
        "transformers tokenizers safetensors tqdm pyarrow reasoning_gym pyfiglet tensorboard "
        "matplotlib scipy".split()
    ),
    "eval": ("vllm", "math_verify", "transformers", "tqdm"),
    "launch": ("nemo_run", "leptonai"),
}
# extras that provide the same modules as another one (named in the message as well)
ALTERNATIVES: dict[str, str] = {"eval": "eval-cpu"}

# subcommand -> the extra it needs (subcommands not listed need only the base install)
SUBCOMMAND_EXTRAS: dict[str, str] = dict.fromkeys(("train", "probe", "data"), "train")
SUBCOMMAND_EXTRAS |= {"eval": "eval", "launch": "launch"}

# subcommand -> the extra it uses when installed but does without (report: its figures)
OPTIONAL_EXTRAS: dict[str, str] = {"report": "train"}

DIST_NAME = "probsft-megatron"


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that fails, or sys.modules[x] = None
        return False


def missing_module(subcommand: str) -> str | None:
    """The first module of the subcommand's extra that is not installed, else None."""
    modules = EXTRA_MODULES.get(SUBCOMMAND_EXTRAS.get(subcommand), ())
    return next((m for m in modules if not _installed(m)), None)


def install_hint(extra: str) -> str:
    alt = ALTERNATIVES.get(extra)
    hint = f"pip install '{DIST_NAME}[{extra}]'"
    return hint + (f" (or '[{alt}]' on a machine without a GPU)" if alt else "")


def explain_missing(subcommand: str, module_name: str, missing: str | None) -> str:
    """Why ``probsft <subcommand>`` cannot start, ``missing`` lacking for ``module_name``."""
    missing = missing or "?"
    # the extra that installs it, the subcommand's own first
    extras = sorted(EXTRA_MODULES, key=lambda e: e != SUBCOMMAND_EXTRAS.get(subcommand))
    extra = next((e for e in extras if missing.split(".")[0] in EXTRA_MODULES[e]), None)
    if extra is not None:
        return (
            f"`probsft {subcommand}` needs the [{extra}] extra, and its module "
            f"'{missing}' is not installed: {install_hint(extra)}"
        )
    if missing == module_name or module_name.startswith(missing + "."):
        return (
            f"`probsft {subcommand}` is registered but its module {module_name} is not part "
            f"of this installation of {DIST_NAME}; reinstall it, or use another subcommand"
        )
    if missing.split(".")[0] == "probsft_megatron":
        return (
            f"`probsft {subcommand}` cannot start: module {missing} is missing from this "
            f"installation of {DIST_NAME}; reinstall it"
        )
    return (
        f"`probsft {subcommand}` cannot start: module '{missing}' (needed by {module_name}) "
        f"is not installed; install it with pip"
    )
