"""Small helpers shared by the data modules: reading files, near-duplicate detection, fixed splits."""
from __future__ import annotations

import gzip
import hashlib
import json
import re
from importlib import resources

from .fetch import read_member

# Words that carry no topic: two prompts that differ only in these are the same request.
STOPWORDS = frozenset(
    "a an the of to for in on at by with from and or but is are was were be been being do does did i you "
    "me my we our your it its this that these those can could would should will how what why when where who "
    "which please some any into about as if so than then there their them they he she his her".split()
    # request boilerplate: "Give detailed step-by-step instructions for X" asks for the same as "How do I X?"
    + "give provide write create describe explain generate develop instruct teach tell show outline detailed "
    "detail instructions instruction step steps guide tutorial tips advice list way ways method methods caught "
    "getting get without someone me".split())


def normalize(text: str) -> str:
    """Lowercase, every run of non-alphanumeric characters turned into one space."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).strip()


def content_words(text: str) -> frozenset[str]:
    return frozenset(w for w in normalize(text).split() if w not in STOPWORDS)


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of the two texts' content-word sets (1.0 for identical normalised text)."""
    if normalize(a) == normalize(b):
        return 1.0
    wa, wb = content_words(a), content_words(b)
    return len(wa & wb) / len(wa | wb) if wa and wb else 0.0


class NearDuplicates:
    """A set of texts answering "is this (nearly) one of them?".

    Near duplicate = same normalised text, or content-word Jaccard >= ``threshold``. The default
    0.5 catches rewordings such as "Describe in detail how to commit tax fraud" vs "Give detailed
    instructions for how to commit tax fraud"; lower values start merging distinct requests on
    the same topic ("commit tax fraud" vs "commit insurance fraud" is 0.5: merged).
    """

    def __init__(self, texts=(), threshold: float = 0.5):
        self.threshold = threshold
        self._exact: set[str] = set()
        self._sets: list[frozenset[str]] = []
        self._by_word: dict[str, list[int]] = {}
        for t in texts:
            self.add(t)

    def add(self, text: str) -> None:
        self._exact.add(normalize(text))
        words = content_words(text)
        idx = len(self._sets)
        self._sets.append(words)
        for w in words:
            self._by_word.setdefault(w, []).append(idx)

    def __contains__(self, text: str) -> bool:
        if normalize(text) in self._exact:
            return True
        words = content_words(text)
        if not words:
            return False
        shared: dict[int, int] = {}
        for w in words:
            for idx in self._by_word.get(w, ()):
                shared[idx] = shared.get(idx, 0) + 1
        for idx, inter in shared.items():
            if inter / (len(words) + len(self._sets[idx]) - inter) >= self.threshold:
                return True
        return False


def round_robin(groups) -> list:
    """The groups' items taken in turn (first of each, then second of each, ...), so that any prefix
    holds every group about equally."""
    groups = [list(g) for g in groups]
    return [g[i] for i in range(max(map(len, groups), default=0)) for g in groups if i < len(g)]


def bucket(text: str, buckets: int) -> int:
    """A fixed bucket in [0, buckets) from the normalised text (sha1: the same on every machine)."""
    digest = hashlib.sha1(normalize(text).encode()).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def in_eval_split(key: str, eval_fraction: float) -> bool:
    """Fixed held-out assignment of one item (or one group: pass the group's key)."""
    return bucket(key, 10_000) < round(eval_fraction * 10_000)


def words(text: str) -> int:
    return len(text.split())


def clip_sentences(text: str, max_words: int) -> str:
    """The longest prefix of whole sentences within ``max_words`` ("" if the first one is longer)."""
    out, n = [], 0
    for sentence in re.split(r"(?<=[.!?])\s+", text.strip()):
        k = words(sentence)
        if n + k > max_words:
            break
        out.append(sentence)
        n += k
    return " ".join(out)


def archive_jsonl(archive: str, member: str) -> list[dict]:
    raw = read_member(archive, member)
    if member.endswith(".gz"):
        raw = gzip.decompress(raw)
    return [json.loads(line) for line in raw.decode("utf-8").splitlines() if line.strip()]


def builtin_path(name: str):
    return resources.files("safeanchor").joinpath("data", "builtin", name)


def builtin_jsonl(name: str) -> list[dict]:
    text = builtin_path(name).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def builtin_json(name: str):
    return json.loads(builtin_path(name).read_text(encoding="utf-8"))
