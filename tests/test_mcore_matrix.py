"""The megatron-core version matrix: compat.py's version branches, and the subset that
scripts/test_mcore.sh runs against each release.

This file is part of that subset, so under ``make test-mcore MCORE=0.14.0`` it checks the
0.14 branches and under ``make test`` the 0.16 ones.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

from probsft_megatron import compat

REPO = Path(__file__).resolve().parents[1]
MCORE = Version(compat.megatron_version())


def test_optimizer_checkpoint_format_exists_in_this_release():
    from megatron.core.optimizer import distrib_optimizer

    fmt = compat.distrib_optim_sharding_type()
    assert fmt == ("dp_reshardable" if MCORE >= Version("0.16") else "dp_zero_gather_scatter")
    # the format is one this release's distributed optimizer implements
    assert f"'{fmt}'" in Path(distrib_optimizer.__file__).read_text()


def test_core_attention_takes_the_keyword_of_this_release():
    import inspect

    from megatron.core.transformer.dot_product_attention import DotProductAttention

    from probsft_megatron.attention import SDPAttention

    cls = compat.core_attention_module(SDPAttention)
    megatron_keyword = (
        "pg_collection"
        if "pg_collection" in inspect.signature(DotProductAttention.__init__).parameters
        else "model_comm_pgs"
    )
    assert megatron_keyword == ("pg_collection" if MCORE >= Version("0.15") else "model_comm_pgs")
    if megatron_keyword == "pg_collection":
        assert cls is SDPAttention
    else:
        assert issubclass(cls, SDPAttention) and cls.__name__ == "SDPAttention"
        init = inspect.signature(cls.__init__)
        assert "model_comm_pgs" in init.parameters


def _subset(name: str = "SUBSET") -> list[str]:
    text = (REPO / "scripts" / "test_mcore.sh").read_text()
    block = re.search(rf"^{name}=\((.*?)^\)", text, re.S | re.M).group(1)
    return [item.strip('"') for item in block.split()]


def test_core_subset_is_part_of_the_subset_and_the_matrix_is_well_formed():
    """VERSION:core runs a part of the full subset (its negative controls included), and the
    Makefile's matrix names the oldest release in full."""
    core = _subset("CORE_SUBSET")
    assert set(core) < set(_subset())
    assert {"tests/test_mcore_matrix.py", "tests/test_parallel_parity.py"} <= set(core)
    makefile = (REPO / "Makefile").read_text()
    matrix = re.search(r"^MCORE_MATRIX \?= (.*)$", makefile, re.M).group(1).split()
    assert all(re.fullmatch(r"[0-9][0-9A-Za-z.]*(:core)?", entry) for entry in matrix), matrix
    oldest = min(matrix, key=lambda entry: Version(entry.split(":")[0]))
    assert ":" not in oldest, f"the oldest release {oldest} must run the whole subset"


@pytest.mark.slow
def test_matrix_subset_names_tests_that_exist():
    """Every entry of scripts/test_mcore.sh's subset collects (a renamed test would silently
    drop out of the matrix otherwise)."""
    subset = _subset()
    assert "tests/test_mcore_matrix.py" in subset
    assert set(_subset("CORE_SUBSET")) <= set(subset)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *subset],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    for entry in subset:
        assert any(line.startswith(entry) for line in collected), entry
    assert len(collected) >= 30, len(collected)
