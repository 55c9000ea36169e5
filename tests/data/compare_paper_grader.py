"""Run the paper's math grader beside ours on the labeled pairs (tests/data/grader_pairs.jsonl).

The paper's evaluation (github.com/GaotangLi/Beyond-Log-Likelihood, evaluations/math) uses
a Qwen2.5-Math-style pipeline: ``extract_answer`` + ``strip_string`` from its parser.py and
``math_equal`` from its grader.py. Its dependencies (sympy 1.12, antlr4 runtime 4.11) clash
with math-verify's, so the comparison runs in two steps, each in its own environment:

1. In an environment with the paper's requirements and a checkout of its repository::

       python tests/data/compare_paper_grader.py paper --paper-math PATH/evaluations/math

   writes tests/data/paper_grader_verdicts.jsonl: ``{"id", "paper_extracted", "paper_correct"}``
   per pair. Each pair is graded as the paper grades a sample of that benchmark
   (``source`` math500 -> ``math_oai``, minerva_math, olympiadbench; hand-written pairs as
   ``math_oai``), with the reference turned into the paper's ground truth the same way
   (OlympiadBench: the first element of ``final_answer`` only), and a 3 s limit per pair.

2. In this project's environment::

       python tests/data/compare_paper_grader.py report

   prints, per category, the accuracy of both graders against the labels and their
   agreement, and where they differ grouped by construction (the tables in docs/eval.md;
   ``--pairs`` lists every differing pair).

Nothing of the paper's code is kept here: step 1 imports it from the given folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
PAIRS = HERE / "grader_pairs.jsonl"
VERDICTS = HERE / "paper_grader_verdicts.jsonl"
OLYMPIAD = HERE.parent.parent / "eval" / "data" / "olympiadbench.jsonl"
DATA_NAME = {
    "math500": "math_oai",
    "minerva_math": "minerva_math",
    "olympiadbench": "olympiadbench",
    "hand": "math_oai",
}


def _read(path: Path) -> list[dict]:
    return [
        json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()
    ]


def _paper_item(args):
    """(prediction, ground truth) -> paper verdict; runs in a worker process."""
    prediction, truth = args
    from grader import math_equal  # the paper's grader.py (sys.path set by run_paper)

    return bool(math_equal(prediction, truth))


def run_paper(paper_math: Path) -> int:
    from concurrent.futures import TimeoutError

    sys.path[:0] = [str(paper_math), str(paper_math / "latex2sympy")]
    os.chdir(paper_math)
    from parser import STRIP_EXCEPTIONS, extract_answer, strip_string
    from pebble import ProcessPool  # the paper's evaluate.py grades the same way

    first_answer = {
        ",".join(row["final_answer"]): row["final_answer"][0] for row in _read(OLYMPIAD)
    }
    pairs = _read(PAIRS)
    jobs, extracted = [], []
    for pair in pairs:
        data_name = DATA_NAME[pair["source"]]
        if data_name == "olympiadbench":
            truth = strip_string(first_answer.get(pair["reference"], pair["reference"]).strip("$"))
        elif data_name == "minerva_math":
            truth = extract_answer("\\boxed{" + pair["reference"] + "}", data_name)
        else:
            truth = strip_string(extract_answer("\\boxed{" + pair["reference"] + "}", data_name))
        prediction = strip_string(
            extract_answer(pair["response"], data_name), skip_unit=data_name in STRIP_EXCEPTIONS
        )
        jobs.append((prediction, truth))
        extracted.append(prediction)
    verdicts = []
    with ProcessPool(max_workers=2) as pool:
        results = pool.map(_paper_item, jobs, timeout=3).result()
        for _ in jobs:
            try:
                verdicts.append(next(results))
            except TimeoutError:
                verdicts.append(False)
    lines = [
        json.dumps({"id": p["id"], "paper_extracted": e, "paper_correct": v}, ensure_ascii=False)
        for p, e, v in zip(pairs, extracted, verdicts)
    ]
    VERDICTS.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {len(lines)} verdicts to {VERDICTS}")
    return 0


def tally(pairs: list[dict], ours: list[bool], paper: list[bool]) -> dict[str, list[int]]:
    """Per category (and "all"):
    [pairs, labeled correct, ours = label, paper = label, ours = paper]."""
    rows: dict[str, list[int]] = defaultdict(lambda: [0] * 5)
    for pair, mine, theirs in zip(pairs, ours, paper):
        for name in (pair["category"], "all"):
            row = rows[name]
            row[0] += 1
            row[1] += pair["label"]
            row[2] += mine == pair["label"]
            row[3] += theirs == pair["label"]
            row[4] += mine == theirs
    rows["all"] = rows.pop("all")  # last
    return dict(rows)


def table(rows: dict[str, list[int]]) -> str:
    """The per-category table of docs/eval.md."""
    lines = [
        "| category | pairs | labeled correct | ours = label | paper's = label | ours = paper's |",
        "|---|---|---|---|---|---|",
    ]
    for name, (n, true, ours, paper, agree) in rows.items():
        cells = [f"{k} ({100 * k / n:.1f}%)" for k in (ours, paper, agree)]
        lines.append(f"| {name} | {n} | {true} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def report() -> int:
    sys.path.insert(0, str(HERE.parent.parent))
    from probsft_megatron.eval.graders import grade_math

    pairs = _read(PAIRS)
    paper = {v["id"]: v for v in _read(VERDICTS)}
    grades = [grade_math(p["response"], p["reference"]) for p in pairs]
    theirs = [paper[p["id"]]["paper_correct"] for p in pairs]
    print(table(tally(pairs, [g.correct for g in grades], theirs)))
    boxed = [i for i, g in enumerate(grades) if g.source == "boxed"]
    agree = sum(grades[i].correct == theirs[i] for i in boxed)
    print(
        f"pairs with a boxed answer: ours = paper's on {agree}/{len(boxed)} "
        f"({100 * agree / len(boxed):.1f}%)\n"
    )
    groups: dict[tuple, int] = defaultdict(int)
    for pair, grade, verdict in zip(pairs, grades, theirs):
        if grade.correct != verdict:
            direction = (
                "paper's accepts, ours rejects" if verdict else "ours accepts, paper's rejects"
            )
            groups[(direction, pair["category"], pair["note"], pair["label"])] += 1
    print("| where they differ | category | construction | label | pairs |\n|---|---|---|---|---|")
    for (direction, category, note, label), count in sorted(groups.items()):
        print(
            f"| {direction} | {category} | {note} | {'correct' if label else 'wrong'} | {count} |"
        )
    if "--pairs" in sys.argv:
        for pair, grade, verdict in zip(pairs, grades, theirs):
            if grade.correct != verdict:
                print(
                    f"{pair['id']:22s} label={pair['label']!s:5} ours={grade.correct!s:5} "
                    f"paper={verdict!s:5} "
                    f"{pair['reference']!r} | {paper[pair['id']]['paper_extracted']!r}"
                )
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="step", required=True)
    paper = sub.add_parser(
        "paper", help="grade the pairs with the paper's code (its own environment)"
    )
    paper.add_argument(
        "--paper-math",
        type=Path,
        required=True,
        help="the paper repository's evaluations/math folder",
    )
    rep = sub.add_parser("report", help="compare the paper's verdicts with ours, per category")
    rep.add_argument(
        "--pairs", action="store_true", help="also list every pair where the graders differ"
    )
    args = parser.parse_args()
    return run_paper(args.paper_math.resolve()) if args.step == "paper" else report()


if __name__ == "__main__":
    sys.exit(main())
