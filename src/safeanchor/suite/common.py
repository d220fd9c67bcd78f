"""Plumbing shared by the evaluation tasks: options, item selection, records, data provenance."""
from __future__ import annotations

import dataclasses
import difflib
import json
import os
import random
import tarfile
from pathlib import Path
from typing import Callable, Iterable

from ..data.fetch import ARCHIVES, archive_path, cache_dir
from ..errors import SafeAnchorError


def opt(default, help: str):
    """A dataclass field with its help text (options of a task)."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_options(cls, options: dict, task: str):
    """An instance of the options dataclass ``cls``; strings (from the CLI) are converted to the field's
    type; an unknown key is an error naming the nearest valid one."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    values = {}
    for key, value in options.items():
        if key not in names:
            near = difflib.get_close_matches(key, list(names), n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise SafeAnchorError(f"unknown option {key!r} for task {task}{hint}; options: {', '.join(names)}")
        default = names[key].default
        if isinstance(value, str) and not isinstance(default, str) and default is not None:
            value = _convert(value, type(default), task, key)
        values[key] = value
    return cls(**values)


def _convert(text: str, kind: type, task: str, key: str):
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        return kind(text)
    except ValueError:
        raise SafeAnchorError(f"option {task}.{key}={text!r} is not a valid {kind.__name__}") from None


def select(items: list, limit: int | None, seed: int, stratum: Callable | None = None) -> tuple[list, str]:
    """(the items to score, a description of the selection). ``limit`` None or >= len(items) keeps all
    items in order. Otherwise a seeded sample: shuffled with ``seed``, then taken round-robin over the
    strata (sorted by name) so that every stratum is represented; the result keeps the original order."""
    if limit is None or limit >= len(items):
        return list(items), f"all {len(items)}"
    if limit <= 0:
        raise SafeAnchorError(f"--limit must be positive, got {limit}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    if stratum is None:
        chosen = order[:limit]
        how = f"seeded sample of {limit} of {len(items)} (seed {seed})"
    else:
        groups: dict = {}
        for i in order:
            groups.setdefault(stratum(items[i]), []).append(i)
        queues = [groups[k] for k in sorted(groups, key=str)]
        chosen, depth = [], 0
        while len(chosen) < limit:
            for q in queues:
                if depth < len(q) and len(chosen) < limit:
                    chosen.append(q[depth])
            depth += 1
        how = (f"seeded sample of {limit} of {len(items)} (seed {seed}), stratified over {len(queues)} "
               f"groups")
    return [items[i] for i in sorted(chosen)], how


def task_dir(out_dir: Path, task: str) -> Path:
    path = Path(out_dir) / task
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_jsonl(path: Path, records: Iterable[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return path


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise SafeAnchorError(f"{path} does not exist")
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SafeAnchorError(f"{path} line {lineno} is not valid JSON ({exc.msg}); one JSON object "
                                          f"per line is expected") from None
    return out


def archive_source(name: str, member: str) -> str:
    if name == "bigbench" and bigbench_dir() is not None:
        return f"{bigbench_dir()}/{_task_path(member)}"
    arc = ARCHIVES[name]
    return f"{arc.package}=={arc.version}:{member}"


def data_info(name: str, members: list[str] | str, n_available: int, selection: str, **extra) -> dict:
    """The ``data`` field of a task result: where the items came from and which were used."""
    arc = ARCHIVES[name]
    members = [members] if isinstance(members, str) else list(members)
    if name == "bigbench" and bigbench_dir() is not None:  # read from a BIG-bench clone, not the archive
        return {"directory": str(bigbench_dir()), "members": [_task_path(m) for m in members],
                "license": arc.license, "n_available": n_available, "selection": selection, **extra}
    return {"archive": f"{arc.package}=={arc.version}", "file": arc.filename, "sha256": arc.sha256,
            "members": members, "license": arc.license, "n_available": n_available, "selection": selection, **extra}


BIGBENCH_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
_BIGBENCH_KEEP = ("truthful_qa/", "bbq_lite/resources/")
BIGBENCH_DIR_ENV = "SAFEANCHOR_BIGBENCH_DIR"


def _task_path(member: str) -> str:
    """A member of the BIG-bench sdist as a path under ``benchmark_tasks/``."""
    return member[len(BIGBENCH_ROOT):] if member.startswith(BIGBENCH_ROOT) else member


def bigbench_dir() -> Path | None:
    """``$SAFEANCHOR_BIGBENCH_DIR``: a ``bigbench/benchmark_tasks`` folder (of a clone of
    github.com/google/BIG-bench) to read the task files from instead of the PyPI sdist, which PyPI no longer
    serves; None when unset. A set variable that is not such a folder is an error, not a silent fallback."""
    value = os.environ.get(BIGBENCH_DIR_ENV, "").strip()
    if not value:
        return None
    path = Path(value).expanduser()
    if not (path / "truthful_qa").is_dir() and not (path / "bbq_lite").is_dir():
        raise SafeAnchorError(f"{BIGBENCH_DIR_ENV}={value} has neither truthful_qa/ nor bbq_lite/; point it at the "
                              f"bigbench/benchmark_tasks folder of a BIG-bench clone")
    return path


def bigbench_json(member: str) -> dict:
    """A JSON file of BIG-bench's tasks (path under ``benchmark_tasks/``): from ``$SAFEANCHOR_BIGBENCH_DIR``
    when set (``bigbench_dir``), else from the pinned sdist. The 358 MB archive is read once: the files the
    suite uses (~25 MB) are extracted into the cache on first use."""
    local = bigbench_dir()
    if local is not None:
        if not (local / member).is_file():
            raise SafeAnchorError(f"{local / member} does not exist; {BIGBENCH_DIR_ENV} must be the "
                                  f"bigbench/benchmark_tasks folder of a BIG-bench clone")
        with open(local / member, encoding="utf-8") as fh:
            return json.load(fh)
    target = cache_dir() / "extracted" / "bigbench-1.0.0"
    done = target / ".complete"
    if not done.exists():
        tmp = target.with_name(target.name + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive_path("bigbench")) as tf:
            for info in tf:
                rel = info.name[len(BIGBENCH_ROOT):] if info.name.startswith(BIGBENCH_ROOT) else None
                if rel and info.isfile() and rel.startswith(_BIGBENCH_KEEP):
                    dest = tmp / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(tf.extractfile(info).read())
        (tmp / ".complete").write_text(ARCHIVES["bigbench"].sha256)
        if target.exists():
            import shutil

            shutil.rmtree(target)
        os.replace(tmp, target)
    path = target / member
    if not path.is_file():
        raise SafeAnchorError(f"{member!r} is not in the BIG-bench archive; the pinned archive changed layout")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def rate(count: int, total: int) -> float:
    """Percentage rounded to 2 decimals (0.0 for an empty set)."""
    return round(100.0 * count / total, 2) if total else 0.0


# ---------------------------------------------------------------- generate -> judge, with a file between


def generate_step(model, tokenizer, rows: list[dict], path: Path, max_new_tokens: int, batch_size: int) -> Path:
    """Greedy chat completions of ``row["prompt"]`` for every row, written as JSONL (row + completion)."""
    from ..generation import generate

    completions = generate(model, tokenizer, [r["prompt"] for r in rows], max_new_tokens, batch_size,
                           desc=f"generate {Path(path).parent.name}")
    return write_jsonl(path, [{**r, "completion": c} for r, c in zip(rows, completions)])


def truncate_tokens(text: str, tokenizer, n: int) -> tuple[str, bool]:
    """``text`` cut to its first ``n`` tokens (HarmBench clips generations before judging)."""
    if tokenizer is None or n <= 0:
        return text, False
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= n:
        return text, False
    return tokenizer.decode(ids[:n], skip_special_tokens=True), True


def judge_step(in_path: Path, judge, out_path: Path, tokenizer=None, judge_tokens: int = 512) -> list[dict]:
    """Judge every {prompt, completion} line of ``in_path`` (completions truncated to ``judge_tokens``
    tokens of ``judge.tokenizer``, else of ``tokenizer``); writes rows + label (+ the judge's details)."""
    rows = read_jsonl(in_path)
    for i, r in enumerate(rows):
        if not isinstance(r.get("prompt"), str) or not isinstance(r.get("completion"), str):
            raise SafeAnchorError(f"{in_path} line {i + 1} needs string fields 'prompt' and 'completion'")
    judge.load()
    clip_with = getattr(judge, "tokenizer", None) or tokenizer
    clipped = [truncate_tokens(r["completion"], clip_with, judge_tokens) for r in rows]
    labels = judge([r["prompt"] for r in rows], [c for c, _ in clipped])
    details = getattr(judge, "details", None) or [{}] * len(rows)
    if len(labels) != len(rows):
        raise SafeAnchorError(f"judge {judge.name} returned {len(labels)} labels for {len(rows)} completions")
    out = [{**r, "judged_completion_truncated": cut, "label": int(lab), **({"judge": d} if d else {})}
           for r, (_, cut), lab, d in zip(rows, clipped, labels, details)]
    write_jsonl(out_path, out)
    return out


def label_counts(records: list[dict]) -> dict:
    n = len(records)
    n1 = sum(r["label"] == 1 for r in records)
    n0 = sum(r["label"] == 0 for r in records)
    return {"n": n, "n_safe": n1, "n_unsafe": n0, "n_unparseable": n - n1 - n0}
