"""``safeanchor eval``: run evaluation tasks on a model (optionally with a PEFT adapter), or judge and
score an existing completions file.

    safeanchor eval --model DIR [--adapter DIR] --tasks harmbench,truthfulqa,bbq [--judge NAME]
                    [--limit N] [--seed S] [--set TASK.KEY=VALUE ...] --out DIR
    safeanchor eval --completions FILE [--tasks harmbench|humaneval] [--judge NAME] --out DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import SafeAnchorError
from . import TASKS, evaluate, parse_tasks, summary_markdown

DEFAULT_TASKS = "harmbench,truthfulqa,bbq"


def add_eval_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="evaluate a model on safety / domain / general tasks",
                              description="Run evaluation tasks; writes OUT/metrics.json, OUT/summary.md and "
                                          "per-item records under OUT/<task>/.")
    p.add_argument("--model", help="HF hub id, local directory, .gguf, embedded:smollm2 or tiny-random")
    p.add_argument("--adapter", help="a PEFT adapter directory to load on top of --model")
    p.add_argument("--run", help="a finished `safeanchor run` directory: evaluate its aligned base and the adapter "
                   "after every domain (OUT/<k>-<after>/, OUT/trajectory.md; OUT defaults to RUN/suite, where "
                   "`safeanchor compare` finds it); reruns skip finished steps")
    p.add_argument("--steps", default="all", help="with --run: which steps, 'all' (default), 'last' (the model "
                   "after the last domain, e.g. for GCG, whose per-method ranking `safeanchor compare` correlates "
                   "with the benign one) or a comma list of step names (base, medical, ...)")
    p.add_argument("--tasks", help=f"comma list of: {', '.join(TASKS)} (default: {DEFAULT_TASKS})")
    p.add_argument("--judge", default="keyword", help="refusal judges: keyword (offline), wildguard-refusal; harm "
                   "judges: llamaguard, llamaguard2, llamaguard3, llamaguard3-1b, wildguard, harmbench (alias "
                   "harmbench-cls), KIND:MODEL_ID, or a Llama Guard id. Each task reports what its judge measures "
                   "(HarmBench: refusal_rate for a refusal judge, safe_rate for a harm judge)")
    p.add_argument("--limit", type=int, help="at most N items per task (a seeded, stratified sample)")
    p.add_argument("--seed", type=int, default=0, help="seed of the --limit sample and of few-shot draws")
    p.add_argument("--set", action="append", default=[], metavar="TASK.KEY=VALUE",
                   help="a task option, e.g. bbq.bias_definition=pos_amb, mmlu.num_fewshot=5")
    p.add_argument("--out", help="output directory (required unless --list)")
    p.add_argument("--list", action="store_true", help="list the tasks and their options (for --set), then exit")
    p.add_argument("--completions", help="judge and score this JSONL instead of generating: {prompt, completion} "
                   "lines (HarmBench) or {task_id, completion} lines (HumanEval)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    p.set_defaults(func=run_eval)
    return p


def parse_sets(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        task, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise SafeAnchorError(f"--set {item!r} must look like TASK.KEY=VALUE, e.g. bbq.bias_definition=pos_amb")
        if task not in TASKS:
            raise SafeAnchorError(f"--set {item!r}: unknown task {task!r}; tasks: {', '.join(TASKS)}")
        out.setdefault(task, {})[name] = value
    return out


def load_for_eval(name: str, adapter: str | None, device: str = "auto", dtype: str = "float32"):
    from ..config import ModelConfig
    from ..models import load_model

    model, tokenizer = load_model(ModelConfig(name=name, device=device, dtype=dtype))
    if adapter:
        if not (Path(adapter) / "adapter_config.json").is_file():
            raise SafeAnchorError(f"--adapter {adapter} is not a PEFT adapter directory (no adapter_config.json)")
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model, tokenizer


def tokenizer_only(name: str):
    """The tokenizer of --model (truncates completions for judges without their own tokenizer)."""
    from ..models import EMBEDDED, TINY, embedded_hf_dir, tiny_tokenizer

    if name == TINY:
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(embedded_hf_dir()) if name == EMBEDDED else name)
    except (OSError, ValueError) as exc:
        raise SafeAnchorError(f"cannot load the tokenizer of {name!r} ({str(exc)[:120]})") from None


def _completions_kind(path: Path, tasks: list[str] | None) -> str:
    if tasks:
        chosen = [t for t in tasks if t in ("harmbench", "humaneval")]
        if len(chosen) != 1 or len(tasks) != 1:
            raise SafeAnchorError("--completions scores one task: give --tasks harmbench or --tasks humaneval")
        return chosen[0]
    with open(path, encoding="utf-8") as fh:
        first = next((line for line in fh if line.strip()), "")
    try:
        row = json.loads(first) if first else {}
    except json.JSONDecodeError:
        raise SafeAnchorError(f"{path} line 1 is not JSON; one JSON object per line is expected") from None
    if "task_id" in row:
        return "humaneval"
    if "prompt" in row and "completion" in row:
        return "harmbench"
    raise SafeAnchorError(f"{path}: lines need prompt+completion (HarmBench) or task_id+completion (HumanEval)")


def _score_completions(args, tasks: list[str] | None) -> dict:
    from ..judges import get_judge

    path = Path(args.completions)
    if not path.is_file():
        raise SafeAnchorError(f"--completions {path} does not exist")
    kind = _completions_kind(path, tasks)
    out = Path(args.out)
    if kind == "humaneval":
        from .humaneval import score_completions

        result = score_completions(path, out)
    else:
        from .harmbench import score_completions

        tokenizer = tokenizer_only(args.model) if args.model else None
        opts = parse_sets(args.set).get("harmbench", {})
        result = score_completions(path, get_judge(args.judge), out, judge_tokens=int(opts.get("judge_tokens", 512)),
                                   tokenizer=tokenizer)
    report = {"tasks": {kind: result}, "seconds": {}, "judge": result.get("judge", {"name": args.judge}),
              "limit": None, "seed": None, "completions": str(path)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(report, indent=2, default=str))
    (out / "summary.md").write_text(summary_markdown(report))
    return report


def list_tasks() -> str:
    """Every task with its options (name, default, help) from its Options dataclass."""
    import dataclasses

    from . import get_task

    lines = []
    for name in TASKS:
        try:
            module = get_task(name)
        except SafeAnchorError as exc:
            lines.append(f"{name}: unavailable ({exc})")
            continue
        summary = " ".join((module.__doc__ or "").strip().split("\n\n")[0].split())
        lines.append(f"{name}: {summary if len(summary) <= 110 else summary[:110].rsplit(' ', 1)[0] + ' ...'}")
        options = getattr(module, "Options", None)
        for f in dataclasses.fields(options) if options else []:
            lines.append(f"    {name}.{f.name}={f.default!r}  {f.metadata.get('help', '')}")
    return "\n".join(lines)


def run_base_model(run_dir: Path, results: dict) -> str:
    """The model every adapter of a run sits on: the run's aligned base (``base_model_dir``), or for an
    ``aligned: false`` run (no alignment stage: base_model_dir is null) the run's own ``model.name``
    (config.json, else results.json's ``model``)."""
    if results.get("base_model_dir"):
        return str(run_dir / results["base_model_dir"])
    cfg_path = run_dir / "config.json"
    name = None
    if cfg_path.is_file():
        try:
            name = json.loads(cfg_path.read_text())["config"]["model"]["name"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SafeAnchorError(f"--run {run_dir}: config.json has no config.model.name; pass --model (and "
                                  f"--adapter) instead") from None
    name = name or results.get("model")
    if not name:
        raise SafeAnchorError(f"--run {run_dir} names no model (no base_model_dir, config.json or results 'model'); "
                              f"pass --model and --adapter instead")
    return name


def step_report(folder: Path) -> dict | None:
    """A step folder's metrics.json, with a metrics.previous.json left by an interrupted merge folded in."""
    def read(name):
        path = folder / name
        return json.loads(path.read_text()) if path.is_file() else None

    current, previous = read("metrics.json"), read("metrics.previous.json")
    if previous is not None and current is not None:
        return merge_reports(folder, previous, current)
    return current or previous


def missing_tasks(done: dict | None, tasks: list[str]) -> list[str]:
    """The tasks of ``tasks`` a step folder's earlier metrics.json (``done``) lacks or has failed: a rerun
    with other tasks into the same --out adds them instead of skipping the folder."""
    if done is None:
        return list(tasks)
    have = done.get("tasks", {})
    todo = [t for t in tasks if t != "composite" and (t not in have or "error" in have[t])]
    if "composite" in tasks and "composite_safety" not in done:
        todo.append("composite")
    return todo


def kept_with_other_settings(done: dict, kept: list[str], limit, seed, options: dict) -> list[str]:
    """Lines naming the tasks of ``kept`` (asked for, but already in the step folder's report ``done``:
    not in ``missing_tasks``) that ran with another --limit, --seed or --set: they are not measured again,
    and the user is told so."""
    lines = []
    for t in kept:
        ran = done.get("limits", {}).get(t) or {"limit": done.get("limit"), "seed": done.get("seed")}
        old_opts = (done.get("options") or {}).get(t, {})
        if ran.get("limit") != limit or ran.get("seed") != seed or old_opts != options.get(t, {}):
            lines.append(f"{t}: kept from an earlier call (limit {ran.get('limit')}, seed {ran.get('seed')}, options "
                         f"{old_opts or {}}), not measured again with limit {limit}, seed {seed}, options "
                         f"{options.get(t, {}) or {}}; pass another --out to measure it with these settings")
    return lines


def merge_reports(folder: Path, done: dict, new: dict) -> dict:
    """metrics.json of a step folder = the earlier report with the new tasks' results added (each task keeps
    the limit and seed it ran with, under ``limits``), summary.md rewritten; metrics.previous.json removed."""
    merged = {**done, "tasks": {**done.get("tasks", {}), **new["tasks"]},
              "seconds": {**done.get("seconds", {}), **new.get("seconds", {})},
              "options": {**(done.get("options") or {}), **(new.get("options") or {})},
              "limits": {**{t: {"limit": done.get("limit"), "seed": done.get("seed")} for t in done.get("tasks", {})},
                         **done.get("limits", {}),
                         **{t: {"limit": new.get("limit"), "seed": new.get("seed")} for t in new["tasks"]}}}
    for key in ("composite_safety", "composite"):
        if key in new:
            merged[key] = new[key]
    (folder / "metrics.json").write_text(json.dumps(merged, indent=2, default=str))
    (folder / "summary.md").write_text(summary_markdown(merged))
    (folder / "metrics.previous.json").unlink(missing_ok=True)
    return merged


def select_steps(steps: list[dict], spec: str, run_dir: Path) -> list[tuple[int, dict]]:
    """(index, step) of a run's steps named by ``--steps``: 'all', 'last' or a comma list of step names."""
    indexed = list(enumerate(steps))
    if spec == "all":
        return indexed
    if spec == "last":
        return indexed[-1:]
    names = [n.strip() for n in str(spec).split(",") if n.strip()]
    known = [s["after"] for s in steps]
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise SafeAnchorError(f"--steps {spec}: {run_dir} has the steps {', '.join(known)}; give 'all', 'last' or "
                              f"some of those names, comma-separated")
    return [(k, s) for k, s in indexed if s["after"] in names]


def _eval_run(args) -> int:
    """Every step of a finished run (base, +domain 1, ...; ``--steps`` chooses) through the same tasks: a
    trajectory. A step folder that already holds some of the tasks gets the missing ones added."""
    from ..judges import get_judge

    run_dir, out = Path(args.run), Path(args.out)
    path = run_dir / "results.json"
    if not path.is_file():
        raise SafeAnchorError(f"--run {run_dir}: no results.json; pass a directory made by `safeanchor run`")
    results = json.loads(path.read_text())
    base = run_base_model(run_dir, results)
    tasks = parse_tasks(args.tasks or DEFAULT_TASKS)
    chosen = select_steps(results["steps"], getattr(args, "steps", "all"), run_dir)
    sets = parse_sets(args.set)
    judge = get_judge(args.judge)
    rows = []
    for k, step in chosen:
        folder = out / f"{k}-{step['after']}"
        done = step_report(folder)
        todo = missing_tasks(done, tasks)
        kept = [t for t in tasks if t not in todo and t != "composite"] if done is not None else []
        for line in kept_with_other_settings(done, kept, args.limit, args.seed, sets):
            print(f"safeanchor: {folder.name}: {line}", file=sys.stderr)
        if todo:
            adapter = str(run_dir / step["adapter"]) if step.get("adapter") else None
            model, tokenizer = load_for_eval(base, adapter, args.device, args.dtype)
            if done is not None:  # kept until the new tasks are merged in (evaluate rewrites metrics.json)
                (folder / "metrics.previous.json").write_text(json.dumps(done, indent=2, default=str))
            report = evaluate(model, tokenizer, todo, folder, judge=judge, limit=args.limit, seed=args.seed,
                              options=sets, meta={"model": base, "adapter": adapter,
                                                                  "run": str(run_dir), "after": step["after"]})
            del model
            if done is not None:
                merge_reports(folder, done, report)
        rows.append((k, step["after"], json.loads((folder / "metrics.json").read_text())))
    for k, step in enumerate(results["steps"]):  # steps evaluated by an earlier call stay in the trajectory
        folder = out / f"{k}-{step['after']}"
        if k not in {r[0] for r in rows} and (folder / "metrics.json").is_file():
            rows.append((k, step["after"], json.loads((folder / "metrics.json").read_text())))
    rows = [(after, rep) for _, after, rep in sorted(rows, key=lambda r: r[0])]
    lines = trajectory_lines(results, tasks, rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "trajectory.md").write_text("\n".join(lines) + "\n")
    (out / "trajectory.json").write_text(json.dumps(
        {"run": str(run_dir), "method": results["method"], "seed": results["seed"], "tasks": tasks,
         "steps": [{"after": a, "tasks": rep["tasks"]} for a, rep in rows]}, indent=2, default=str))
    print("\n".join(lines))
    failed = {(a, t): r["error"] for a, rep in rows for t, r in rep["tasks"].items() if "error" in r}
    for (after, task), msg in failed.items():
        print(f"safeanchor: error: {after}: task {task}: {msg}", file=sys.stderr)
    return 2 if failed else 0


# metrics shown in a --run trajectory table (everything is in trajectory.json)
_HEADLINE = {"harmbench": ("score", "asr"), "humaneval": ("pass@1",), "truthfulqa": ("mc1", "mc2"),
             "bbq": ("bias",), "mmlu": ("acc",), "medqa": ("acc",), "legalbench": ("balanced_accuracy",),
             "gcg": ("refusal_rate_clean", "refusal_rate_attack", "asr"), "wildguard": ("harmful_response_rate",)}
_PROPORTIONS = {("harmbench", "score"), ("harmbench", "asr"), ("mmlu", "acc"), ("medqa", "acc"),
                ("humaneval", "pass@1"), ("wildguard", "harmful_response_rate")}


def trajectory_lines(results: dict, tasks: list[str], rows: list[tuple[str, dict]]) -> list[str]:
    """The --run trajectory table: each step's headline metrics, and composite safety (Eq. 8) whenever a
    step's report has it (its inputs are the harmbench / truthfulqa / bbq columns; which metric and
    definition each is goes in the line under the table)."""
    metrics = sorted({(t, m) for _, rep in rows for t, res in rep["tasks"].items() for m, v in res.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and m in _HEADLINE.get(t, ())})
    from ..stats import fmt_ci, wilson_pct

    comp = any("composite_safety" in rep for _, rep in rows)
    props = [tm for tm in metrics if tm in _PROPORTIONS]  # % of the task's n items: a Wilson 95% interval each
    lines = [f"# {results['method']} seed {results['seed']}: {', '.join(tasks)} after every step", "",
             "| after | " + " | ".join([f"{t} {m}" for t, m in metrics] + (["composite safety"] if comp else [])
                                      + [f"{t} {m} 95% CI" for t, m in props]) + " |",
             "|---|" + "---|" * (len(metrics) + comp + len(props))]
    for after, rep in rows:
        vals = [rep["tasks"].get(t, {}).get(m) for t, m in metrics] + ([rep.get("composite_safety")] if comp else [])
        cis = [fmt_ci(wilson_pct(rep["tasks"].get(t, {}).get(m), rep["tasks"].get(t, {}).get("n")), 2)
               for t, m in props]
        lines.append(f"| {after} | " + " | ".join(["" if v is None else f"{v:.2f}" for v in vals] + cis) + " |")
    last = next((rep["composite"] for _, rep in reversed(rows)
                 if isinstance(rep.get("composite"), dict) and "inputs" in rep["composite"]), None)
    if last:
        inp = last["inputs"]
        lines += ["", f"composite safety = {last['formula']} with HarmBench {inp['harmbench']['metric']} (judge "
                  f"{(inp['harmbench'].get('judge') or {}).get('name')}), TruthfulQA {inp['truthfulqa']['metric']}, "
                  f"BBQ bias ({inp['bbq_bias']['definition']})."]
    return lines


def run_eval(args) -> int:
    if getattr(args, "list", False):
        print(list_tasks())
        return 0
    if getattr(args, "run", None) and not args.out:
        args.out = str(Path(args.run) / "suite")
    if getattr(args, "steps", "all") != "all" and not getattr(args, "run", None):
        raise SafeAnchorError(f"--steps {args.steps}: steps are those of a run; pass --run RUN_DIR with it")
    if not args.out:
        raise SafeAnchorError("safeanchor eval needs --out DIR")
    if args.completions:
        report = _score_completions(args, parse_tasks(args.tasks) if args.tasks else None)
    elif getattr(args, "run", None):
        return _eval_run(args)
    else:
        tasks = parse_tasks(args.tasks or DEFAULT_TASKS)
        if not args.model:
            raise SafeAnchorError("safeanchor eval needs --model (or --completions FILE to score existing outputs)")
        from ..judges import get_judge

        judge = get_judge(args.judge)  # a judge that cannot load fails before any model is loaded
        model, tokenizer = load_for_eval(args.model, args.adapter, args.device, args.dtype)
        report = evaluate(model, tokenizer, tasks, args.out, judge=judge, limit=args.limit, seed=args.seed,
                          options=parse_sets(args.set), meta={"model": args.model, "adapter": args.adapter})
    print(summary_markdown(report))
    print(f"wrote {Path(args.out) / 'metrics.json'} and summary.md")
    failed = {t: r["error"] for t, r in report["tasks"].items() if "error" in r}
    for task, msg in failed.items():
        print(f"safeanchor: error: task {task}: {msg}", file=sys.stderr)
    return 2 if failed else 0
