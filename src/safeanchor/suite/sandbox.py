"""Run untrusted Python (model-written code) in a contained child process.

``run_untrusted(code)`` starts a root-owned *launcher* (this file run as a script: ``python -I -S
sandbox.py --launch CONFIG``, with a minimal environment, in a new session) that builds the sandbox,
forks the program and supervises it. What is guaranteed, and how (isolation="namespaces", the
default; it needs root, else it fails loudly unless the caller passes isolation="none"):

- no network: the launcher ``unshare``\\ s a new network namespace (only a loopback, and that is
  down: connect() to 127.0.0.1 or any address fails with ENETUNREACH); also new IPC and UTS ones.
- no writes outside the sandbox's own directory: a new mount namespace (propagation private, so
  nothing leaks to the host) in which (a) a size-capped tmpfs is mounted on /tmp and the work
  directory (cwd, HOME, TMPDIR) is /tmp/work in it, (b) every other mount is bind-remounted read-only
  and nosuid, (c) empty read-only tmpfs hide /run, /var/tmp, /dev/shm; and the program runs as an
  unprivileged uid/gid with no supplementary groups, so root-owned files are not writable even
  where (b) could not apply. Nothing of the sandbox's files exists on the host: the tmpfs vanishes
  with the namespace.
- no secrets: the environment is replaced by PATH/HOME/TMPDIR/LANG; the new PID namespace gets its
  own /proc, so other processes (and their environ/cmdline) are invisible; the interpreter runs with
  ``-I`` (no PYTHON* variables, no user site, no script directory on sys.path).
- bounded resources: RLIMIT_CPU, RLIMIT_AS (``memory_mb`` per process), RLIMIT_NPROC
  (``max_processes``; binds because the uid is not root and is unique to this sandbox: the uid is
  2,000,000,000 + 100 * (parent pid mod 100,000) + a slot number, an id no account uses, so
  concurrent sandboxes do not share the count), RLIMIT_FSIZE, RLIMIT_NOFILE, RLIMIT_CORE = 0;
  the tmpfs size and inode count cap the total written.
- everything ends: the program is PID 1 of a new PID namespace; the launcher kills it at the
  wall-clock ``timeout``, and when a PID namespace's init dies the kernel kills every process in it,
  including children that left the process group or session (setsid, double fork). If the
  launcher itself is killed (the parent's own deadline, timeout + 10 s, kills the launcher's
  process group), the program's parent-death signal (SIGKILL) fires and the same happens.
- no privilege regained: PR_SET_NO_NEW_PRIVS before exec (setuid binaries do not elevate).

Limits: total memory of a program that forks is up to ``memory_mb * max_processes`` (no cgroup is
created: the host's cgroups belong to whoever runs the machine); the sandbox can *read* files that
are world-readable on the host. The interpreter is this process's own base interpreter (its
directory is bind-mounted read-only into view when its parents are not world-traversable, e.g.
under /root), started with ``-I -B -S``: the standard library only, no site-packages.

isolation="none" (explicit opt-out, e.g. unprivileged users): rlimits (RLIMIT_NPROC does not bind
for root), a new session killed as a group at the deadline, a scrubbed environment, a fresh
temporary directory removed afterwards; no network, filesystem or escaped-process containment.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

TAIL = 4000  # characters of stdout / stderr kept in the result
SETUP_FAILED = 97  # launcher exit status: the isolation could not be built
UID_BASE = 2_000_000_000

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_MOVE, MS_REC, MS_PRIVATE = 32, 4096, 8192, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
MASKED = ("/run", "/var/tmp", "/dev/shm", "/dev/mqueue")


@dataclass
class SandboxResult:
    passed: bool  # exited with status 0 within every limit
    status: str  # "passed" | "failed" (non-zero exit, killed by a limit other than time) | "timeout" | "error"
    returncode: int | None  # negative: killed by that signal
    stdout: str  # last TAIL characters
    stderr: str
    elapsed: float  # wall-clock seconds of the program
    isolation: str  # "namespaces" | "none"
    detail: str = ""  # why the status (timeout kind, setup error, ...)


def _error(message: str):
    from ..errors import SafeAnchorError

    return SafeAnchorError(message)


_slots_lock = threading.Lock()
_slots_used: set[int] = set()


class _Slot:
    """A per-process slot number for the sandbox uid (unique among this process's concurrent runs)."""

    def __enter__(self) -> int:
        with _slots_lock:
            free = next(i for i in range(100) if i not in _slots_used)
            _slots_used.add(free)
            self.n = free
        return free

    def __exit__(self, *exc):
        with _slots_lock:
            _slots_used.discard(self.n)


def isolation_available() -> tuple[bool, str]:
    """(can isolation="namespaces" be used here, why not)."""
    if not sys.platform.startswith("linux"):
        return False, "namespaces need Linux"
    if os.geteuid() != 0:
        return False, "namespaces and the uid drop need root (run as root, or pass isolation='none')"
    return True, ""


def run_untrusted(code: str, timeout: float = 10.0, memory_mb: int = 512, *, max_processes: int = 16,
                  max_file_mb: int = 16, disk_mb: int = 64, max_open_files: int = 64,
                  isolation: str = "namespaces", site_packages: bool = False) -> SandboxResult:
    """Run ``code`` as a Python program in the sandbox (module docstring) and report how it ended.

    ``timeout`` is wall-clock seconds from the interpreter's start (CPU time is capped at
    ceil(timeout) + 1 s); ``memory_mb`` is the address-space cap of each process. A sandbox that cannot
    be built raises SafeAnchorError (never a silent weaker run) unless ``isolation="none"``.
    The program runs under ``python -I -B -S`` (standard library only; ``site_packages=True`` drops
    ``-S``, which also costs ~0.1 s of start-up here).
    """
    if isolation not in ("namespaces", "none"):
        raise _error(f"sandbox isolation {isolation!r} is unknown; use 'namespaces' or 'none' (no containment)")
    if isolation == "namespaces":
        ok, why = isolation_available()
        if not ok:
            raise _error(f"cannot sandbox untrusted code: {why}")
    with _Slot() as slot:
        uid = UID_BASE + 100 * (os.getpid() % 100_000) + slot
        config = {"timeout": float(timeout), "memory_mb": int(memory_mb), "max_processes": int(max_processes),
                  "max_file_mb": int(max_file_mb), "disk_mb": int(disk_mb), "max_open_files": int(max_open_files),
                  "isolation": isolation, "site_packages": bool(site_packages), "uid": uid,
                  "base_prefix": os.path.realpath(sys.base_prefix), "python": os.path.realpath(sys.executable)}
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
        cmd = [sys.executable, "-I", "-S", os.path.abspath(__file__), "--launch", json.dumps(config)]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                                cwd="/", start_new_session=True, close_fds=True)
        try:
            out, err = proc.communicate(code.encode("utf-8"), timeout=timeout + 10.0)
        except subprocess.TimeoutExpired:  # not reaped yet, so its group id cannot have been reused
            _kill_group(proc.pid)  # the program's parent-death signal then ends its namespace
            proc.communicate()
            return SandboxResult(False, "timeout", None, "", "", float(timeout), isolation,
                                 "the launcher missed its deadline and was killed")
    if proc.returncode == SETUP_FAILED:
        raise _error(f"cannot sandbox untrusted code: {err.decode(errors='replace').strip()[-500:]}")
    try:
        report = json.loads(out.decode("utf-8").strip().splitlines()[-1])
    except (ValueError, IndexError):
        return SandboxResult(False, "error", proc.returncode, "", err.decode(errors="replace")[-TAIL:], 0.0, isolation,
                             "the launcher returned no report")
    return SandboxResult(**report)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ---------------------------------------------------------------------------------------------
# The launcher: runs as `python -I -S sandbox.py --launch CONFIG` (standard library only below).


class _Setup(Exception):
    """The isolation could not be built."""


def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("mount", "unshare", "prctl"):
        getattr(libc, name).restype = ctypes.c_int
    return libc, ctypes


def _mount(src, target, fstype, flags, data=None):
    libc, ctypes = _libc()
    enc = (lambda s: None if s is None else s.encode())
    if libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise _Setup(f"mount {src} on {target} ({fstype}, flags {flags:#x}) failed: {os.strerror(err)}")


def _mounts() -> list[tuple[str, int]]:
    """(mount point, per-mount flags to keep) of this mount namespace, parents first."""
    keep = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC}
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            fields = line.split()
            point = fields[4].encode().decode("unicode_escape")  # \040 etc. are octal escapes
            flags = sum(keep.get(o, 0) for o in fields[5].split(","))
            out.append((point, flags))
    return out


def _traversable(path: str) -> bool:
    """Every directory from / to ``path`` is searchable by "other" (the sandbox uid)."""
    parts = path.rstrip("/").split("/")
    for i in range(1, len(parts) + 1):
        st = os.stat("/".join(parts[:i]) or "/")
        if not st.st_mode & 0o001:
            return False
    return True


def _expose(path: str, stage: str) -> None:
    """Make ``path`` reachable for the sandbox uid at the same location: bind it to ``stage``, cover
    its first non-traversable ancestor with a read-only tmpfs, and move the bind back to ``path``."""
    if _traversable(path):
        return
    parts = path.rstrip("/").split("/")
    top = next("/".join(parts[:i]) for i in range(2, len(parts) + 1)
               if not os.stat("/".join(parts[:i])).st_mode & 0o001)
    os.makedirs(stage)
    _mount(path, stage, None, MS_BIND | MS_REC)
    _mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=64k,mode=0755")
    os.makedirs(path, mode=0o755)
    _mount(stage, path, None, MS_MOVE)
    _mount(None, path, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)
    _mount(None, top, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _build_namespaces(cfg: dict) -> str:
    """Unshare and lay out the filesystem (module docstring); returns the work directory."""
    libc, ctypes = _libc()
    flags = CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS
    if libc.unshare(flags) != 0:
        raise _Setup(f"unshare(network, mount, pid namespaces) failed: {os.strerror(ctypes.get_errno())}")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # must succeed before any mount, or mounts reach the host
    if cfg["base_prefix"].startswith("/tmp/") or cfg["python"].startswith("/tmp/"):
        raise _Setup("the interpreter lives under /tmp, which the sandbox replaces")
    _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={cfg['disk_mb']}m,nr_inodes=4096,mode=0755")
    for prefix in sorted({cfg["base_prefix"], os.path.dirname(os.path.dirname(cfg["python"]))}):
        _expose(prefix, f"/tmp/.stage{len(os.listdir('/tmp'))}")
    for path in MASKED:
        if os.path.isdir(path) and not os.path.islink(path):
            _mount("tmpfs", path, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0755")
    skip = {"/tmp", *MASKED}
    for point, keep in _mounts():
        if point in skip or point.startswith("/tmp/"):
            continue
        try:
            _mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | keep)
        except _Setup:
            if point == "/":
                raise
            # a mount that cannot be remounted (e.g. hidden beneath another) stays as it was; the uid drop
            # still keeps root-owned files there unwritable
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    os.chown(work, cfg["uid"], cfg["uid"])
    return work


def _limits(cfg: dict) -> None:
    import math
    import resource

    cpu = math.ceil(cfg["timeout"]) + 1
    mb = 1024 * 1024
    for what, value in ((resource.RLIMIT_CPU, (cpu, cpu + 1)), (resource.RLIMIT_AS, cfg["memory_mb"] * mb),
                        (resource.RLIMIT_NPROC, cfg["max_processes"]), (resource.RLIMIT_FSIZE, cfg["max_file_mb"] * mb),
                        (resource.RLIMIT_NOFILE, cfg["max_open_files"]), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(what, value if isinstance(value, tuple) else (value, value))


def _child(cfg: dict, work: str, program: str, err_w: int, outputs: tuple[int, int]) -> None:
    """In the fork: become the program (never returns). ``outputs`` are the write ends of its stdout and
    stderr files; setup errors go to ``err_w``."""
    try:
        strict = cfg["isolation"] == "namespaces"
        os.setsid()
        if strict:
            try:  # PID 1 of the new namespace: a /proc that shows only the sandbox's processes
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RDONLY)
            except _Setup:
                pass  # the host's /proc stays (read-only); other users' environ is unreadable anyway
        null = os.open("/dev/null", os.O_RDONLY)
        for fd, target in ((null, 0), (outputs[0], 1), (outputs[1], 2)):
            os.dup2(fd, target)
            os.close(fd)
        os.chdir(work)
        _limits(cfg)
        if strict:
            uid = cfg["uid"]
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            libc, _ = _libc()
            libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # cleared by setuid, so set after it
        env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
        flags = ["-I", "-B"] + ([] if cfg["site_packages"] else ["-S"])
        os.execve(cfg["python"], [cfg["python"], *flags, program], env)
    except BaseException as exc:  # noqa: BLE001 - report anything, then die
        os.write(err_w, f"{type(exc).__name__}: {exc}".encode()[:2000])
    os._exit(127)


def _tail(fd: int) -> str:
    """The last TAIL characters of an output file, read through the launcher's own descriptor (the
    program may replace the file's name with a link to something else; the descriptor keeps the inode)."""
    size = os.fstat(fd).st_size
    data = os.pread(fd, 4 * TAIL, max(0, size - 4 * TAIL))
    return data.decode("utf-8", errors="replace")[-TAIL:]


def _wait(pid: int, timeout: float) -> tuple[int, bool]:
    """(wait status, timed out) of ``pid``, killed at the deadline. The program's process group is killed
    before the program is reaped, while its zombie still holds the group id (no reuse race)."""
    import select

    deadline = time.monotonic() + timeout
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        fd = None
    timed_out = False
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            timed_out = True
            os.kill(pid, signal.SIGKILL)  # PID 1 of its namespace: its death kills every process in it
            break
        if fd is not None:
            select.select([fd], [], [], left)
        else:
            time.sleep(min(left, 0.005))
    _kill_group(pid)
    status = os.waitpid(pid, 0)[1]
    if fd is not None:
        os.close(fd)
    return status, timed_out


def _launch(cfg: dict) -> int:
    import shutil
    import tempfile

    code = sys.stdin.buffer.read()
    strict = cfg["isolation"] == "namespaces"
    try:
        work = _build_namespaces(cfg) if strict else tempfile.mkdtemp(prefix="safeanchor-sandbox-")
    except (_Setup, OSError) as exc:
        sys.stderr.write(str(exc))
        return SETUP_FAILED
    program = os.path.join(work, "program.py")
    with open(program, "wb") as fh:
        fh.write(code)
    if strict:
        os.chown(program, cfg["uid"], cfg["uid"])
    writers, readers = [], []
    for name in ("stdout", "stderr"):  # root-owned 0600: the program holds only the inherited write end
        path = os.path.join(work, name)
        writers.append(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        readers.append(os.open(path, os.O_RDONLY | os.O_NOFOLLOW))
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.close(err_r)
        _child(cfg, work, program, err_w, tuple(writers))
    for fd in (err_w, *writers):
        os.close(fd)
    status, timed_out = _wait(pid, cfg["timeout"])
    elapsed = round(time.monotonic() - start, 3)
    setup_error = os.read(err_r, 4000).decode(errors="replace")
    rc = os.waitstatus_to_exitcode(status)
    stdout, stderr = _tail(readers[0]), _tail(readers[1])
    if not strict:
        shutil.rmtree(work, ignore_errors=True)
    if setup_error:
        if strict:
            sys.stderr.write(f"sandbox child setup failed: {setup_error}")
            return SETUP_FAILED
        state, detail = "error", f"setup failed: {setup_error}"
    elif timed_out:
        state, detail = "timeout", f"wall-clock limit {cfg['timeout']} s"
    elif rc == -signal.SIGXCPU:
        state, detail = "timeout", "CPU-time limit"
    elif rc == 0:
        state, detail = "passed", ""
    else:
        state, detail = "failed", f"exit status {rc}"
    report = {"passed": state == "passed", "status": state, "returncode": rc, "stdout": stdout, "stderr": stderr,
              "elapsed": elapsed, "isolation": cfg["isolation"], "detail": detail}
    sys.stdout.write(json.dumps(report) + "\n")
    return 0


if __name__ == "__main__" and sys.argv[1:2] == ["--launch"]:
    sys.exit(_launch(json.loads(sys.argv[2])))
