"""HumanEval: pass@k against brute force, real problems' canonical solutions, completion extraction, and
the sandbox against hostile programs (each contained, reported failed, nothing left behind)."""
import itertools
import json
import os
import random
import secrets
import shutil
import socket
import stat
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from safeanchor.errors import SafeAnchorError
from safeanchor.suite import humaneval as he
from safeanchor.suite import sandbox
from safeanchor.suite.sandbox import run_untrusted

ISOLATED, WHY = sandbox.isolation_available()
needs_sandbox = pytest.mark.skipif(not ISOLATED, reason=f"sandbox isolation unavailable: {WHY}")


@pytest.fixture(scope="module")
def problems():
    try:
        return {p["task_id"]: p for p in he.load_problems()}
    except SafeAnchorError as exc:
        pytest.skip(f"HumanEval archive unavailable: {exc}")


# ---------------------------------------------------------------- pass@k


def brute_pass_at_k(n, c, k):
    """Fraction of all k-subsets of n samples (c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        c, k = rng.randint(0, n), rng.randint(1, n)
        assert he.pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(n, c, k), abs=1e-12)
    assert he.pass_at_k(200, 0, 100) == 0.0 and he.pass_at_k(200, 101, 100) == 1.0
    assert 0.0 < he.pass_at_k(10_000, 1, 1) < 1e-3  # the product form stays finite where C(n, k) overflows
    with pytest.raises(ValueError):
        he.pass_at_k(3, 4, 1)


def test_pass_at_ks_reports_only_k_up_to_the_samples():
    out = he.pass_at_ks([(5, 1), (5, 0)], [1, 5, 10])
    assert out == {"pass@1": 10.0, "pass@5": 50.0}


# ---------------------------------------------------------------- completion extraction


def test_extract_completion_rules():
    fenced = "Sure!\n```python\nimport math\n\ndef f(x):\n    return math.floor(x)\n```\nThis works."
    assert he.extract_completion(fenced, "f") == "import math\n\ndef f(x):\n    return math.floor(x)\n"
    other_first = "```python\nprint(1)\n```\n```python\ndef f(x):\n    return 2\n```"
    assert he.extract_completion(other_first, "f") == "def f(x):\n    return 2\n"
    assert he.extract_completion("```\nreturn x + 1\n```", "f") == "    return x + 1\n"
    assert he.extract_completion("    return x\n", "f") == "    return x\n"
    prose = "Here it is:\ndef f(x):\n    return 3\n\nThis returns three."
    assert he.extract_completion(prose, "f") == "def f(x):\n    return 3\n"
    assert he.extract_completion("```python\ndef f(x):\n    return 4", "f") == "def f(x):\n    return 4\n"


# ---------------------------------------------------------------- real problems


@needs_sandbox
def test_canonical_solutions_pass_and_wrong_ones_fail(problems):
    ids = ["HumanEval/0", "HumanEval/2", "HumanEval/38", "HumanEval/53", "HumanEval/163"]
    for tid in ids:
        assert he.check(problems[tid], problems[tid]["canonical_solution"]) == {"passed": True, "result": "passed"}
    wrong = {"HumanEval/0": "    return False\n", "HumanEval/53": "    return x - y\n",
             "HumanEval/2": problems["HumanEval/53"]["canonical_solution"],  # the wrong function's body
             "HumanEval/163": "    import sys\n    sys.exit(0)\n",  # leaving early is no pass
             "HumanEval/38": "    return s\n"}
    for tid, body in wrong.items():
        res = he.check(problems[tid], body)
        assert res["passed"] is False and res["result"].startswith("failed"), (tid, res)
    # a full redefinition (rule 2) keeps the prompt's helpers: decode_cyclic uses encode_cyclic
    full = "def decode_cyclic(s: str):\n    return encode_cyclic(encode_cyclic(s))\n"
    assert he.check(problems["HumanEval/38"], full)["passed"]


# ---------------------------------------------------------------- hostile programs


def _marker_processes(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


@pytest.fixture
def outside():
    """A world-writable directory outside /tmp (visible inside the sandbox) holding a root-owned 0644
    sentinel, so that only the read-only mounts stop writes and deletions there."""
    base = "/var/lib" if os.access("/var/lib", os.W_OK) else None
    if base is None:
        pytest.skip("no writable location outside /tmp for the sentinel")
    path = Path(tempfile.mkdtemp(prefix="safeanchor-sandbox-test-", dir=base))
    path.chmod(0o777)
    sentinel = path / "sentinel.txt"
    sentinel.write_text("keep me")
    sentinel.chmod(0o644)
    yield path, sentinel
    shutil.rmtree(path, ignore_errors=True)


def hostile_programs(marker: str, outside: Path, sentinel: Path, host_tmp: Path, escape: Path, port: int) -> dict:
    """name -> (code, expected status). Each prints what it observed as JSON on its last line."""
    return {
        "infinite_loop": ("while True:\n    pass\n", "timeout"),
        "fork_storm": (textwrap.dedent(f"""
            import json, os, time
            made = 0
            for i in range(300):  # bounded: at most 300 forks (most refused by RLIMIT_NPROC)
                try:
                    pid = os.fork()
                except OSError:
                    continue
                if pid == 0:
                    try:
                        os.setsid()  # leave the process group and session
                        if os.fork() == 0:
                            os.execv("/bin/sleep", ["sleep", "{marker}"])
                    finally:
                        os._exit(0)
                made += 1
            time.sleep(0.3)
            print(json.dumps({{"forked": made}}))
            raise SystemExit(1)
            """), "failed"),
        "memory_bomb": (textwrap.dedent("""
            import json
            hog = []
            try:
                while True:
                    hog.append(bytearray(64 * 1024 * 1024))
            except MemoryError:
                print(json.dumps({"held_mb": 64 * len(hog)}))
                raise
            """), "failed"),
        "escape_write": (textwrap.dedent(f"""
            import json
            wrote = []
            for path in [{str(escape)!r}, {str(outside / "written.txt")!r}, {str(host_tmp / "written.txt")!r},
                         "/var/tmp/safeanchor_escape", "/dev/shm/safeanchor_escape", "/etc/safeanchor_escape",
                         "/tmp/safeanchor_escape"]:
                try:
                    with open(path, "w") as fh:
                        fh.write("escaped")
                    wrote.append(path)
                except OSError:
                    pass
            print(json.dumps({{"wrote": wrote}}))
            raise SystemExit(1)
            """), "failed"),
        "escape_delete": (textwrap.dedent(f"""
            import json, os, shutil
            seen = os.path.exists({str(sentinel)!r})
            deleted = []
            for attempt in (lambda: os.remove({str(sentinel)!r}), lambda: os.rename({str(sentinel)!r}, "/tmp/work/x"),
                            lambda: shutil.rmtree({str(outside)!r})):
                try:
                    attempt()
                    deleted.append(True)
                except OSError:
                    deleted.append(False)
            print(json.dumps({{"seen": seen, "deleted": deleted}}))
            raise SystemExit(1)
            """), "failed"),
        "network": (textwrap.dedent(f"""
            import json, socket
            ok = []
            for host, port in (("127.0.0.1", {port}), ("8.8.8.8", 53), ("1.1.1.1", 443)):
                try:
                    socket.create_connection((host, port), timeout=1).close()
                    ok.append(host)
                except OSError:
                    pass
            try:
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53))
                ok.append("udp")
            except OSError:
                pass
            print(json.dumps({{"connected": ok}}))
            raise SystemExit(1)
            """), "failed"),
        "secret": (textwrap.dedent("""
            import json, os
            found = [k for k in os.environ if "SECRET" in k]
            for pid in [p for p in os.listdir("/proc") if p.isdigit()] + ["self"]:
                try:
                    with open(f"/proc/{pid}/environ", "rb") as fh:
                        if b"SAFEANCHOR_TEST_SECRET" in fh.read():
                            found.append(pid)
                except OSError:
                    pass
            print(json.dumps({"found": found, "pids": sorted(p for p in os.listdir("/proc") if p.isdigit())}))
            raise SystemExit(1)
            """), "failed"),
    }


def _observed(res) -> dict:
    return json.loads(res.stdout.strip().splitlines()[-1])


@needs_sandbox
def test_hostile_programs_are_contained(outside, tmp_path, monkeypatch):
    secret = secrets.token_hex(16)
    monkeypatch.setenv("SAFEANCHOR_TEST_SECRET", secret)
    marker = f"1000.{secrets.randbelow(10**9)}"  # sleep's argument: a unique, harmless marker
    escape = Path(f"/tmp/safeanchor_escape_{secrets.token_hex(6)}")
    outside_dir, sentinel = outside
    host_tmp = tmp_path / "host"
    host_tmp.mkdir()
    host_tmp.chmod(0o777)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.setblocking(False)
    programs = hostile_programs(marker, outside_dir, sentinel, host_tmp, escape, listener.getsockname()[1])
    results = {name: run_untrusted(code, timeout=2.0) for name, (code, _) in programs.items()}
    for name, (_, expected) in programs.items():
        assert results[name].status == expected, (name, results[name])
        assert not results[name].passed
    assert results["infinite_loop"].elapsed < 4
    assert 0 < _observed(results["fork_storm"])["forked"] < 300  # RLIMIT_NPROC bound the storm
    assert _observed(results["memory_bomb"])["held_mb"] <= 512
    assert _observed(results["escape_write"])["wrote"] == []
    assert not escape.exists() and not (outside_dir / "written.txt").exists()
    assert not (host_tmp / "written.txt").exists()
    seen = _observed(results["escape_delete"])
    assert seen == {"seen": True, "deleted": [False, False, False]}  # the sentinel was visible, and stayed
    assert sentinel.read_text() == "keep me" and stat.S_IMODE(sentinel.stat().st_mode) == 0o644
    assert _observed(results["network"])["connected"] == []
    with pytest.raises(BlockingIOError):
        listener.accept()  # nothing reached the host's loopback
    listener.close()
    observed = _observed(results["secret"])
    assert observed["found"] == [] and observed["pids"] == ["1"]  # own PID namespace: no other process visible
    assert secret not in "".join(r.stdout + r.stderr for r in results.values())
    time.sleep(0.2)
    assert _marker_processes(marker) == []  # no process of the storm outlived its sandbox


@needs_sandbox
def test_humaneval_scoring_survives_hostile_completions(problems, outside, tmp_path):
    """The evaluation finishes; hostile samples are failed or timed out, correct ones still pass."""
    marker = f"1000.{secrets.randbelow(10**9)}"
    escape = Path(f"/tmp/safeanchor_escape_{secrets.token_hex(6)}")
    outside_dir, sentinel = outside
    programs = hostile_programs(marker, outside_dir, sentinel, tmp_path, escape, 9)
    samples = [{"task_id": "HumanEval/0", "completion": "    return False\n" + code} for code, _ in programs.values()]
    samples += [{"task_id": tid, "completion": problems[tid]["canonical_solution"]}
                for tid in ("HumanEval/1", "HumanEval/4")]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(s) + "\n" for s in samples))
    start = time.time()
    metrics = he.score_completions(path, tmp_path / "out", timeout=1.5)
    assert time.time() - start < 30
    results = [json.loads(line) for line in (tmp_path / "out" / "humaneval" / "results.jsonl").read_text().splitlines()]
    hostile = [r for r in results if r["task_id"] == "HumanEval/0"]
    assert len(hostile) == len(programs) and not any(r["passed"] for r in hostile)
    assert {r["result"].split(":")[0] for r in hostile} == {"failed", "timed out"}
    assert metrics["n"] == 3 and metrics["pass@1"] == pytest.approx(200 / 3, abs=0.01)
    # the endless loop always times out; on a loaded machine a fork storm may hit the 1.5 s limit too
    assert 1 <= metrics["n_timed_out"] <= 2 and metrics["complete"] is False
    assert not escape.exists() and sentinel.read_text() == "keep me"
    time.sleep(0.2)
    assert _marker_processes(marker) == []


@needs_sandbox
def test_sandbox_reports_plain_outcomes():
    ok = run_untrusted("import os\nprint('hi', os.getcwd(), os.getuid() != 0)")
    assert ok.passed and ok.status == "passed" and ok.stdout.strip() == "hi /tmp/work True"
    bad = run_untrusted("raise ValueError('nope')")
    assert bad.status == "failed" and bad.returncode == 1 and "ValueError: nope" in bad.stderr
    # renaming its output file to a link to a root-only file does not make the launcher read that file
    swap = run_untrusted("import os, sys\nprint('mine', flush=True)\nos.remove('stdout')\n"
                         "os.symlink('/etc/shadow', 'stdout')\nprint('more', flush=True)")
    assert swap.passed and swap.stdout == "mine\nmore\n"


def test_sandbox_fails_loudly_without_isolation(monkeypatch):
    monkeypatch.setattr(sandbox, "isolation_available", lambda: (False, "simulated"))
    with pytest.raises(SafeAnchorError, match="simulated"):
        run_untrusted("print(1)")
    with pytest.raises(SafeAnchorError, match="isolation"):
        run_untrusted("print(1)", isolation="maybe")
    weak = run_untrusted("print(1)", isolation="none")  # the explicit opt-out still runs, with rlimits only
    assert weak.passed and weak.isolation == "none" and weak.stdout.strip() == "1"
    assert run_untrusted("while True: pass", timeout=1.0, isolation="none").status == "timeout"


def test_run_writes_human_eval_files(tmp_path, monkeypatch, problems):
    """The task end to end with the tiny model (its replies are noise; the files and counts are checked)."""
    if not ISOLATED:
        pytest.skip(WHY)
    from safeanchor.models import tiny_model, tiny_tokenizer

    out = he.run(tiny_model(), tiny_tokenizer(), out_dir=tmp_path, limit=2, max_new_tokens=8, timeout=2.0)
    folder = tmp_path / "humaneval"
    samples = [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(set(s) == {"task_id", "completion"} for s in samples)
    assert len((folder / "results.jsonl").read_text().splitlines()) == 2
    assert out["n"] == 2 and "pass@1" in out and "pass@10" not in out and out["decoding"] == "greedy"
