"""Small generated SFT tasks that span the model-capability continuum (docs/continuum.md):
records drawn from a fixed pool of items by a seeded generator; a stable hash puts each item
in one split, so no test question is trained."""

from __future__ import annotations

import functools
import json
import random
import re
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from probsft_megatron.errors import ConfigError, DataError
from probsft_megatron.figfont import figfont_records

SPLITS = ("train", "test")
TEST_SHARE = 4
"""One pool item in ``TEST_SHARE`` goes to the test split (by a stable hash of the item)."""
WORD_TEST_SHARE = 3
"""The word tasks (a smaller pool) put one word in three into the test split."""

_ONES = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen "
    "fourteen fifteen sixteen seventeen eighteen nineteen"
).split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()

# Common English words of 2-6 letters (no proper nouns), the pool of the word tasks.
WORDS = frozenset(
    """
able acid aged also area army away baby back ball band bank base bath bear beat bed bell belt best
bird blow blue boat body bone book boot born boss both bowl box boy bread bus busy cake call calm
camp card care cart case cash cat cell chat chef city clay club coal coat code cold cook cool copy
corn cost crew crop cup cut dark data date dawn day deal dear deep desk dish dog door down draw drop
drum duck dust duty each earn east easy edge egg else even ever exam face fact fair farm fast fear
feet felt file film fine fire firm fish flag flat flow fog food foot form fox free frog fuel full
fund game gate gift girl glad goal gold golf good gown gray grow hair half hall hand hard hat head
heat help hero high hill hold hole home hope horn host hour huge idea inch iron item jazz job join
joke jump jury just keen keep key kind king kite lake lamp land lane last late lazy leaf left lens
life lift line lion list live loan lock long loud love luck lung made mail main make map mark mask
meal meat milk mind mint mist moon most move much nail name navy neck need nest news nice nine note
oak oven page pair palm park past path peak pen pet pink pipe plan play plum poem pond pool port
post pull pure quiz race rail rain rate read real rest rice rich ride ring road rock roof room root
rope rose ruby rule safe sail salt sand seat seed ship shoe shop side sign silk sing size skin sky
slow snow soap sock sofa soft soil song soup star stem step sun swim tail talk tall tank tape task
taxi team tent test text tide tile time tiny tool tour town toy tree trip tube tune van vast vote
wait walk wall warm wave wax week well west wide wild wind wine wing wire wise wish wolf wood wool
word work yard year zero zone apple beach bread chair clock cloud dance dream field flame glass
grape green heart horse house juice lemon light money mouse music night ocean paint paper party
piano plant radio river robot salad sheep smile snake space spoon storm sugar table tiger toast
tower train water whale wheel world ant arm art bag bat bee bin bow cab cap car cow cry dam den dew
dig dot dry ear elf elm eye fan fig fin fit fly fog fur gap gas gem gum gym hen hip hog hop hot hut
ice ink ivy jam jar jaw jet jog jug kid kit lab lap law leg lid lip log low mad man mat mix mob mop
mud mug net nod nut oar oil owl pad pan paw pea pie pig pin pit pot pub rag ram rat ray rib rim rod
row rug saw sea set sip sit ski sob son spa spy tab tag tan tap tar tea ten tie tin tip toe ton top
tub tug web wig win yak yam yes zip zoo bark barn bead beam bean bike bolt bulb cage cane cape cave
chin clip comb crab crow cube dart deer dime dock doll dove duke dune fawn fern foam fork frost glue
goat gulf harp hawk herb hive hook hoop horn jade kelp knee knot lace lamb lime loaf mane mare maze
mill mole moss moth mule nose nut opal pear pest pine pole puma rake reef rope rust sack seal shed
silo slab sled slug snail sofa swan tent toad tusk vase vest vine wasp whip yarn
""".split()
)


def number_words(n: int) -> str:
    """``85`` -> ``eighty-five`` (0 <= n < 1000)."""
    if not 0 <= n < 1000:
        raise ValueError(f"number_words covers 0..999, got {n}")
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    return _ONES[n // 100] + " hundred" + (" " + number_words(n % 100) if n % 100 else "")


def _is_test(task: str, item: Any) -> bool:
    """Whether ``item`` of ``task`` is a test item: a CRC of the word, else of the number pair's
    repr (self-addition's phrasing left out: no test pair is trained under any phrasing)."""
    if task in WORD_TASKS:
        return zlib.crc32(item.encode()) % WORD_TEST_SHARE == 0
    if task == "self-addition":
        item = item[:2]
    return zlib.crc32(repr(item).encode()) % TEST_SHARE == 0


@dataclass(frozen=True)
class TaskSpec:
    """A generated task: its pool of items, how an item becomes a record, how to corrupt one;
    ``max_length``: the ``data.max_length`` every example needs with SmolLM2's template."""

    name: str
    description: str
    pool: Callable[[], list[Any]]
    make: Callable[[Any], tuple[str, str, str]]  # item -> (prompt, response, reference)
    wrong: Callable[[Any, random.Random], str]  # item -> a plausible wrong response
    max_length: int
    grader: str = "jaro_winkler"
    max_new_tokens: int = 24


def _pairs(low: int, high: int) -> list[tuple[int, int]]:
    return [(a, b) for a in range(low, high + 1) for b in range(low, high + 1)]


def _wrong_sum(total: int, rng: random.Random) -> int:
    """A wrong non-negative sum close to ``total`` (off by 1-10)."""
    while True:
        delta = rng.choice([-1, 1]) * rng.randint(1, 10)
        if total + delta >= 0:
            return total + delta


def _sums(prompt: str | None, answer: str, words: bool = False):
    """``(make, wrong)`` of an addition task over items ``(a, b[, phrasing])``: ``prompt``
    (None: the item's phrasing) and ``answer`` format ``a``, ``b`` and the sum ``s``."""

    def text(item, total: int) -> str:
        return answer.format(a=item[0], b=item[1], s=number_words(total) if words else total)

    def make(item):
        question = SELF_TEMPLATES[item[2]] if prompt is None else prompt
        correct = text(item, item[0] + item[1])
        return question.format(a=item[0], b=item[1]), correct, correct

    def wrong(item, rng: random.Random) -> str:
        return text(item, _wrong_sum(item[0] + item[1], rng))

    return make, wrong


def _count(item):
    start, end = item
    text = ", ".join(str(i) for i in range(start, end + 1))
    return f"Count from {start} to {end}.", text, text


def _count_wrong(item, rng):
    values = list(range(item[0], item[1] + 1))
    values[rng.randrange(1, len(values))] += rng.choice([-2, 1, 2])
    return ", ".join(map(str, values))


def _scrambled(word: str, rng: random.Random) -> str:
    """``word`` shuffled, never ``word`` itself (one letter replaced if no other order exists)."""
    for _ in range(20):
        letters = list(word)
        rng.shuffle(letters)
        if "".join(letters) != word:
            return "".join(letters)
    i = rng.randrange(len(word))
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if word.isupper() else "abcdefghijklmnopqrstuvwxyz"
    return word[:i] + rng.choice([c for c in alphabet if c != word[i]]) + word[i + 1 :]


def _figlet(word):
    import pyfiglet

    art = pyfiglet.Figlet(font="mini").renderText(" ".join(word.upper())).rstrip()
    return f"Which word is drawn here?\n{art}", word.upper(), word.upper()


def _word_pool(low: int, high: int) -> Callable[[], list[str]]:
    return lambda: sorted({w for w in WORDS if low <= len(w) <= high})


_TWO_DIGIT = functools.partial(_pairs, 10, 99)
_QUESTION = "What is {a} + {b}?"
SELF_TEMPLATES = (
    "What is {a} + {b}?",
    "What is {a} plus {b}?",
    "Calculate {a} + {b}.",
    "What is the sum of {a} and {b}?",
    "Add {a} and {b}.",
    "How much is {a} + {b}?",
)
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec(
            "addition",
            "two-digit addition in SmolLM2's answer style (37 + 48 = 85)",
            _TWO_DIGIT,
            *_sums(_QUESTION, "{a} + {b} = {s}"),
            max_length=56,
            max_new_tokens=16,
        ),
        TaskSpec(
            "addition-answer",
            "two-digit addition, answered 'The answer is 85.'",
            _TWO_DIGIT,
            *_sums(_QUESTION, "The answer is {s}."),
            max_length=52,
            max_new_tokens=12,
        ),
        TaskSpec(
            "addition-number",
            "two-digit addition, answered with the bare number",
            _TWO_DIGIT,
            *_sums(_QUESTION + " Answer with just the number.", "{s}"),
            max_length=52,
            max_new_tokens=8,
        ),
        TaskSpec(
            "addition-words",
            "two-digit addition, answered in words (eighty-five)",
            _TWO_DIGIT,
            *_sums(_QUESTION + " Write the answer in words.", "{s}", words=True),
            max_length=56,
            max_new_tokens=12,
        ),
        TaskSpec(
            "count",
            "count from a to b (8-16 numbers)",
            lambda: [(a, a + n - 1) for a in range(1, 100) for n in range(8, 17)],
            _count,
            _count_wrong,
            max_length=112,
            max_new_tokens=72,
        ),
        TaskSpec(
            "reverse",
            "reverse the letters of a common word (3-6 letters)",
            _word_pool(3, 6),
            lambda w: (f"Reverse the letters of '{w}'.", w[::-1], w[::-1]),
            lambda w, rng: _scrambled(w[::-1], rng),
            max_length=48,
            max_new_tokens=8,
        ),
        TaskSpec(
            "figlet-mini",
            "a 2-4 letter word drawn in pyfiglet's mini font",
            _word_pool(2, 4),
            _figlet,
            lambda w, rng: _scrambled(w.upper(), rng),
            max_length=80,
            max_new_tokens=6,
        ),
        TaskSpec(
            "self-addition",
            "sums of 1-30 asked six ways; trained on the model's own correct answers (--from-eval)",
            lambda: [(a, b, t) for a, b in _pairs(1, 30) for t in range(len(SELF_TEMPLATES))],
            *_sums(None, "{a} + {b} = {s}."),
            max_length=56,
            grader="exact",
            max_new_tokens=16,
        ),
    )
}
WORD_TASKS = ("reverse", "figlet-mini")
FIGFONT = "figfont"
"""The paper's figlet-font task, generated by :mod:`probsft_megatron.figfont`."""


def get_task(name: str) -> TaskSpec:
    if name not in TASKS:
        names = ", ".join([*TASKS, FIGFONT])
        raise ConfigError(f"unknown task {name!r}; generated tasks: {names}")
    return TASKS[name]


def records(task: str, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
    """``n`` records of ``task`` drawn without replacement from ``split``'s pool (all when
    None) in an order fixed by ``seed``; ``figfont``: the paper's items (``seed`` ignored)."""
    if split not in SPLITS:
        raise ConfigError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    if n is not None and n < 1:
        raise ConfigError(f"the number of records must be >= 1, got {n}")
    if task == FIGFONT:
        rows = [
            (r["index"], (r["prompt"], r["response"], r["response"]), {})
            for r in figfont_records(split, n=n)
        ]
    else:
        spec = get_task(task)
        pool = [item for item in spec.pool() if _is_test(task, item) == (split == "test")]
        if n is not None and n > len(pool):
            raise ConfigError(
                f"task {task} has {len(pool)} {split} items, fewer than the {n} asked for; lower --n"
            )
        rng = random.Random(f"probsft-tasks:{task}:{split}:{seed}")
        items = [pool[k] for k in rng.sample(range(len(pool)), len(pool) if n is None else n)]
        rows = [
            (i, spec.make(item), {"item": list(item) if isinstance(item, tuple) else item})
            for i, item in enumerate(items)
        ]
    texts = ("prompt", "response", "reference")
    return [
        {**dict(zip(texts, made)), "task": task, "id": i, **item, "corrupted": False}
        for i, made, item in rows
    ]


def corrupt(recs: list[dict], fraction: float, seed: int = 0) -> list[dict]:
    """A copy of ``recs`` with ``round(fraction * len)`` responses (chosen by ``seed``)
    replaced by the task's plausible wrong answer (``corrupted: true``)."""
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"the corrupted fraction must be in [0, 1], got {fraction}")
    rng = random.Random(f"probsft-corrupt:{seed}")
    chosen = set(rng.sample(range(len(recs)), round(fraction * len(recs))))
    return [
        {**rec, "response": _wrong_response(rec, rng), "corrupted": True}
        if i in chosen
        else dict(rec)
        for i, rec in enumerate(recs)
    ]


def _wrong_response(rec: dict, rng: random.Random) -> str:
    task = rec.get("task")
    if task == FIGFONT:
        return _scrambled(rec["response"], rng)
    spec = get_task(task)
    item = tuple(rec["item"]) if isinstance(rec["item"], list) else rec["item"]
    if task == "self-addition" and rec.get("source") == "model":
        total = item[0] + item[1]
        return re.sub(rf"(?<!\d){total}(?!\d)", str(_wrong_sum(total, rng)), rec["response"])
    return spec.wrong(item, rng)


def self_answer_records(questions: list[dict], samples_path: str | Path) -> tuple[list[dict], dict]:
    """``questions`` whose first ``samples.jsonl`` completion is correct and ends a sentence, with
    it as the response (``source: model``), and counts ``{"questions", "correct", "kept"}``."""
    path = Path(samples_path)
    if not path.is_file():
        raise DataError(
            f"{path} does not exist; pass the samples.jsonl that `probsft eval "
            "--out DIR` wrote (DIR/<task>/samples.jsonl)"
        )
    by_id = {str(q["id"]): q for q in questions}
    kept, correct, seen = [], 0, 0
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from None
        if not {"id", "completions", "correct"} <= set(sample):
            raise DataError(
                f"{path}:{lineno} is not a `probsft eval` sample (needs id, "
                "completions and correct)"
            )
        question = by_id.get(str(sample["id"]))
        if question is None:
            raise DataError(
                f"{path}:{lineno}: id {sample['id']!r} is not among the questions; "
                "generate them with the same task, split, --n and --seed as the evaluated file"
            )
        seen += 1
        if sample["correct"][0]:
            correct += 1
            text = sample["completions"][0].strip()
            if re.search(r"[.!]\s*$", text):  # it ends a sentence
                kept.append({**question, "response": text, "source": "model"})
    if seen == 0:
        raise DataError(f"{path} holds no samples")
    return kept, {"questions": seen, "correct": correct, "kept": len(kept)}


def render_prompts(recs: list[dict], tokenizer) -> list[dict]:
    """``recs`` for ``probsft eval --task custom --prompt-format raw``: ``prompt`` rendered with
    ``tokenizer``'s chat template up to the assistant's turn, the plain one in ``question``."""
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "the tokenizer has no chat template; evaluate with "
            "--prompt-format qwen/llama instead of rendered prompts"
        )

    def render(prompt: str) -> str:
        user = [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)

    return [{**rec, "question": rec["prompt"], "prompt": render(rec["prompt"])} for rec in recs]
