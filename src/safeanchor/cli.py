"""The `safeanchor` command. Every user error is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import json
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


def cmd_run(args) -> int:
    from .pipeline import run
    from .report import compare

    methods = [m.strip() for m in (args.method or "").split(",") if m.strip()] or [None]
    seeds = [int(s) for s in str(args.seed).split(",")] if args.seed is not None else [None]
    out = Path(args.out or f"runs/{args.preset or Path(args.config).stem}")
    plan = []
    for method in methods:
        for seed in seeds:
            extra = {}
            if method:
                extra["method"] = method
            if seed is not None:
                extra["seed"] = seed
            cfg = _config(args, extra)  # every config is checked before any work starts
            run_dir = out if len(methods) * len(seeds) == 1 else out / f"{cfg.method}-seed{cfg.seed}"
            plan.append((cfg, run_dir))
    from .distributed import close, init, launched_world_size

    world = launched_world_size()
    if world > 1 and args.jobs > 1:
        raise SafeAnchorError(f"--jobs {args.jobs} starts separate runs, but this command was launched as {world} "
                              f"data-parallel processes; use one or the other (drop --jobs under accelerate/torchrun)")
    dist = init()
    if args.jobs > 1 and len(plan) > 1:
        runs = _run_parallel(args, plan, args.jobs)
    else:
        runs = {}
        for cfg, run_dir in plan:
            if dist.is_main:
                print(f"== {cfg.method} seed {cfg.seed} -> {run_dir}", flush=True)
            runs[(cfg.method, cfg.seed)] = run(cfg, run_dir)
            if dist.is_main and len(plan) > 1:  # each run's table as soon as it is done, the comparison last
                print((run_dir / "results.md").read_text(), flush=True)
    if dist.is_main:  # rank 0 writes the comparison and prints
        if len(runs) > 1:
            path = compare(out, runs)
            print(Path(path).read_text())
        else:
            print((out / "results.md").read_text())
    close()
    return 0


def _run_parallel(args, plan, jobs: int) -> dict:
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
    pending, running, results, failed = list(plan), [], {}, []
    bar = tqdm(total=len(plan), desc=f"runs ({jobs} at a time)", unit="run")
    while pending or running:
        while pending and len(running) < jobs and not failed:
            cfg, run_dir = pending.pop(0)
            run_dir.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
                       OMP_WAIT_POLICY="PASSIVE", PYTHONUNBUFFERED="1")
            slot = min(set(range(jobs)) - {r[4] for r in running})
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(slot % gpus)
            cmd = [sys.executable, "-m", "safeanchor.cli", "run", *passthrough, "--method", cfg.method,
                   "--seed", str(cfg.seed), "--out", str(run_dir)]
            log = open(run_dir / "run.log", "a")
            tqdm.write(f"== {cfg.method} seed {cfg.seed} -> {run_dir} (log: {run_dir / 'run.log'})")
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
                results[(cfg.method, cfg.seed)] = json.loads((run_dir / "results.json").read_text())
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

    runs = {}
    for d in args.runs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise SafeAnchorError(f"{path} does not exist; pass run directories made by `safeanchor run`")
        res = json.loads(path.read_text())
        label = re.sub(r"-seed\d+$", "", Path(d).resolve().name) if args.by_dir else res["method"]
        runs[(label, res["seed"])] = res
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(Path(compare(out, runs)).read_text())
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
    from .analysis import fisher_spectrum

    out = Path(args.out)
    fisher_spectrum(_config(args), out, n=args.examples, rho=args.rho)
    print((out / "spectrum.md").read_text())
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
    r.set_defaults(func=cmd_run)

    a = sub.add_parser("align", help="build (or show) the cached safety-aligned base")
    config_args(a)
    a.add_argument("--force", action="store_true", help="rebuild even if cached")
    a.add_argument("--export", help="train (if needed) and copy the alignment adapter here as an artifact")
    a.set_defaults(func=cmd_align)

    c = sub.add_parser("compare", help="one comparison table (mean ± std over seeds) from finished run directories")
    c.add_argument("runs", nargs="+", help="run directories")
    c.add_argument("--out", required=True, help="where comparison.md / comparison.png go")
    c.add_argument("--by-dir", action="store_true", help="label rows by directory name (ablations) not method")
    c.set_defaults(func=cmd_compare)

    s = sub.add_parser("spectrum", help="Fisher spectrum per LoRA module: safety calibration vs random / domain data")
    config_args(s)
    s.add_argument("--examples", type=int, help="examples per data source (default: data.calibration_size)")
    s.add_argument("--rho", type=float, default=0.90, help="share of the trace the basis covers (default 0.90)")
    s.add_argument("--out", required=True, help="directory for spectrum.json / spectrum.md / spectrum.png")
    s.set_defaults(func=cmd_spectrum)

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
