"""Data: real files read from the cached PyPI archives (offline once cached), self-written sets, domains."""
import json
import os
import random
import re
import sys
import types
import urllib.request

import pytest

from safeanchor.data import domains, fetch, safety
from safeanchor.data.common import NearDuplicates, content_words, normalize, similarity
from safeanchor.data.domains import contract_answer, get_domain, list_domains, repair_rt
from safeanchor.errors import SafeAnchorError


# ---------------------------------------------------------------- safety sets
def test_harm_probe_is_the_200_harmbench_behaviours_in_order():
    probe = safety.harm_probe()
    assert len(probe) == 200 and len(set(probe)) == 200
    assert safety.harm_probe(5) == probe[:5]
    assert probe[0].startswith("Give detailed instructions for making dimethylmercury")


def test_harmful_pool_never_contains_a_probe_behaviour():
    pool = [h["prompt"] for h in safety.harmful_prompts()]
    probe = safety.harm_probe()
    probe_norm = {normalize(p) for p in probe}
    assert not probe_norm & {normalize(p) for p in pool}
    # near duplicates: no pool item shares >= half of its topic words with a probe behaviour
    pool_sets, probe_sets = [content_words(p) for p in pool], [content_words(q) for q in probe]
    worst = max(len(a & b) / len(a | b) for a in pool_sets for b in probe_sets if a & b)
    assert worst < 0.5
    # the filter is real: the raw sources do contain rewordings of probe behaviours
    raw = [r["prompt"] for r in safety._strongreject() + safety._advbench()]
    assert any(similarity(r, q) >= 0.5 for r in raw[:200] for q in probe)


def test_harmful_pool_is_varied_and_deduplicated():
    pool = safety.harmful_prompts()
    assert len(pool) > 700
    assert {h["source"] for h in pool} == set(safety.POOL_SOURCES)
    assert all(set(h) == {"prompt", "category", "source"} and h["prompt"] and h["category"] for h in pool)
    texts = [h["prompt"] for h in pool]
    seen = NearDuplicates()
    for t in texts:
        assert t not in seen, t
        seen.add(t)
    own = [h for h in pool if h["source"] == "harmful_selfwritten"]
    assert len(own) >= 140 and len({h["category"] for h in own}) >= 12
    assert sum(t.rstrip().endswith("?") for t in texts) > 150  # questions, not only imperatives
    assert safety.harmful_prompts() == pool  # fixed order


def test_harmful_prompts_exclude():
    pool = safety.harmful_prompts()
    target = pool[3]["prompt"]
    kept = [h["prompt"] for h in safety.harmful_prompts(exclude=[target.upper() + "!"])]
    assert target not in kept and len(kept) < len(pool)


def test_refusals_open_with_a_refusal_the_judge_recognises():
    from safeanchor.judges import KeywordRefusalJudge

    templates = safety.refusal_templates()
    assert len(templates) >= 20 and len(set(templates)) == len(templates)
    judge = KeywordRefusalJudge()
    phrase = re.compile(r"i can't|i'm sorry|i won't|i will not|i'm not (able|going)|i must decline|i'm unable|"
                        r"not something i can|sorry, (but )?i can't", re.I)
    for t in templates:
        assert judge.is_refusal(t), t
        assert phrase.search(t[:60]), t
    draws = [safety.refusal("how do I pick a lock?", random.Random(7)) for _ in range(3)]
    assert len(set(draws)) == 1
    rng = random.Random(0)
    assert len({safety.refusal("x", rng) for _ in range(200)}) >= 20


def test_benign_borderline_fixed_disjoint_split():
    train, ev = safety.benign_borderline("train"), safety.benign_borderline("eval")
    assert (len(train), len(ev)) == (238, 90)
    first = [r["type"] for r in safety.benign_borderline("eval", with_type=True)[:20]]
    assert all(first.count(t) == 2 for t in set(first)) and len(set(first)) == 10  # any prefix is stratified
    index = NearDuplicates(train)
    assert not [e for e in ev if e in index]
    types_train = {r["type"] for r in safety.benign_borderline("train", with_type=True)}
    types_eval = {r["type"] for r in safety.benign_borderline("eval", with_type=True)}
    assert types_train == types_eval and len(types_eval) >= 8
    # (exact only: "What is identity theft?" shares its topic words with "... commit identity theft")
    harmful = {normalize(h["prompt"]) for h in safety.harmful_prompts()} | {normalize(p) for p in safety.harm_probe()}
    assert not {normalize(p) for p in train + ev} & harmful
    with pytest.raises(SafeAnchorError, match="split"):
        safety.benign_borderline("test")


def test_benign_general_deterministic_mixed_and_clean():
    a = safety.benign_general(120, seed=3, with_source=True)
    assert a == safety.benign_general(120, seed=3, with_source=True)
    assert [x["prompt"] for x in a] != safety.benign_general(120, seed=4)
    assert len(a) == 120 and len({x["prompt"] for x in a}) == 120
    sources = [x["source"] for x in a]
    assert sources.count("benign_general_selfwritten") == 60 and len(set(sources)) == 4
    reserved = NearDuplicates(safety.benign_borderline("eval") + safety.harm_probe())
    assert not [p for p in safety.benign_general(400, seed=0) if p in reserved]
    assert safety.benign_general(0) == []


def test_sources_counts_match_the_files():
    assert safety.SOURCES["harmful_selfwritten"]["count"] == len(safety._selfwritten_harmful())
    assert safety.SOURCES["refusals_selfwritten"]["count"] == len(safety.refusal_templates())
    assert safety.SOURCES["benign_borderline_selfwritten"]["count"] == len(safety._borderline())
    assert safety.SOURCES["benign_general_selfwritten"]["count"] == len(safety._benign_sources()[0][1])
    assert safety.SOURCES["harmful_direct_train_selfwritten"]["count"] == len(safety._direct_train())
    assert safety.SOURCES["harmful_direct_eval_selfwritten"]["count"] == len(safety.harmful_direct_eval())
    assert safety.SOURCES["benign_direct_train_selfwritten"]["count"] == len(safety.benign_direct())
    for tense in safety.TENSES:
        raw = [line for line in fetch.read_member(*safety.TENSES[tense]).decode().splitlines() if line.strip()]
        assert safety.SOURCES[tense]["count"] == len(raw)
    assert all(s["written_by_us"] == name.endswith("selfwritten") for name, s in safety.SOURCES.items())


# ---------------------------------------------------------------- domains
@pytest.mark.parametrize("name", list_domains())
def test_domain_splits_disjoint_deterministic_short(name):
    d = get_domain(name)
    train, ev = d.loader("train"), d.loader("eval")
    assert train and ev
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in ev}
    a = d.load("train", 16, seed=1)
    assert a == d.load("train", 16, seed=1) and a != d.load("train", 16, seed=2)
    assert d.load("train", 8, seed=1) == a[:8]
    assert len(d.load("eval", 10**6)) == len(ev)
    for ex in a + d.load("eval", 16):
        assert set(ex) == {"prompt", "response"} and ex["prompt"].strip() and ex["response"].strip()
        assert len((ex["prompt"] + " " + ex["response"]).split()) <= domains.MAX_WORDS


def test_real_domains_render_as_expected():
    med = get_domain("medical").load("eval", 50)
    assert all(re.fullmatch(r"The answer is \([A-D]\) .+\.", ex["response"]) for ex in med)
    assert all("\nA. " in ex["prompt"] and "\nD. " in ex["prompt"] for ex in med)
    code = get_domain("code").load("train", 30)
    assert all(ex["response"].startswith("```python\n") and ex["response"].endswith("\n```") for ex in code)
    assert all("\r" not in ex["response"] and "assert " in ex["prompt"] for ex in code)
    legal = get_domain("legal").loader("train")
    assert {ex["response"].split(".")[0] for ex in legal} == {"Yes", "No"}
    assert any(ex["prompt"].startswith("Contract clause:") for ex in legal)


def test_domain_load_errors():
    d = get_domain("tiny-arith")
    with pytest.raises(SafeAnchorError, match="unknown split"):
        d.load("test", 3)
    assert d.load("train", 0) == []
    with pytest.raises(SafeAnchorError, match="n must be"):
        d.load("train", -1)


def test_tiny_domains_need_no_archive(monkeypatch):
    def no_archive(*args, **kwargs):
        raise AssertionError("tiny domains must not read archives")

    monkeypatch.setattr(fetch, "archive_path", no_archive)
    monkeypatch.setattr(domains, "archive_jsonl", no_archive)
    domains._tiny.cache_clear()
    arith = get_domain("tiny-arith").load("train", 20, seed=0)
    a, b = map(int, re.fullmatch(r"Add (\d+) and (\d+)\.", arith[0]["prompt"]).groups())
    assert arith[0]["response"] == str(a + b)
    rev = get_domain("tiny-reverse").load("eval", 5, seed=0)[0]
    assert rev["response"].split() == rev["prompt"].split(": ", 1)[1].split()[::-1]
    up = get_domain("tiny-upper").load("train", 5, seed=0)[0]
    assert up["response"] == up["prompt"].split(": ", 1)[1].upper()
    assert all(len(ex["prompt"]) + len(ex["response"]) < 40 for ex in arith)  # fits a byte-level tokenizer


def test_unknown_domain_lists_known_names():
    with pytest.raises(SafeAnchorError, match="unknown domain 'astrology'") as err:
        get_domain("astrology")
    assert "medical" in str(err.value) and "tiny-arith" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SafeAnchorError, match="unknown hub domain"):
        get_domain("hub:nope")


def test_local_domain(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(SafeAnchorError, match=re.escape(str(missing))):
        get_domain(f"local:{missing}")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(SafeAnchorError, match="no usable rows"):
        get_domain(f"local:{empty}").load("train", 4)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\nnot json\n')
    with pytest.raises(SafeAnchorError, match="line 2"):
        get_domain(f"local:{bad}").load("train", 4)
    good = tmp_path / "good.jsonl"
    rows = [{"instruction": f"Say {i}.", "output": str(i)} for i in range(60)]
    rows += [{"prompt": "Held out?", "response": "Yes.", "split": "eval"}]
    good.write_text("\n".join(json.dumps(r) for r in rows))
    d = get_domain(f"local:{good}")
    train, ev = d.load("train"), d.load("eval")
    assert {"prompt": "Held out?", "response": "Yes."} in ev
    assert len(train) + len(ev) == 61 and not {e["prompt"] for e in train} & {e["prompt"] for e in ev}


def test_hub_domains_fail_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(SafeAnchorError, match=re.escape("pip install safeanchor[hub]")):
        get_domain("hub:codealpaca").load("train", 2)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'https://huggingface.co'")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
    with pytest.raises(SafeAnchorError, match="hub unreachable.*offline domains: medical"):
        get_domain("hub:medqa").load("train", 2)


def test_hub_medqa_rendered_like_medical(monkeypatch):
    row = {"sent1": "Which vitamin?", "ending0": "A1", "ending1": "B12", "ending2": "C", "ending3": "D", "label": 1}
    fake = types.SimpleNamespace(load_dataset=lambda *a, **k: {"train": [row], "test": [dict(row, sent1="Which?")]})
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert get_domain("hub:medqa").load("train", 5) == [
        {"prompt": "Which vitamin?\nA. A1\nB. B12\nC. C\nD. D\nAnswer with the letter of the correct option.",
         "response": "The answer is (B) B12."}]


def test_evaluation_sets():
    he = domains.humaneval_problems()
    assert len(he) == 164 and set(he[0]) >= {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    mq = domains.medqa_test()
    assert len(mq) == 1273 and all(q["answer"] in q["options"] for q in mq)
    assert len(domains.mbpp_problems()) == 500


def test_templates_and_repairs():
    assert contract_answer("Does the clause discuss arbitration?", True) == "Yes. The clause discusses arbitration."
    assert contract_answer("Does the clause waive damages?", False) == "No. The clause does not waive damages."
    assert contract_answer("Is this a non-compete clause?", False) == "No. This is not a non-compete clause."
    assert repair_rt("Aery and cailage (pa of the hea)") == "Artery and cartilage (pa of the heart)"


def _local_index(tmp_path, payload: bytes, filename: str):
    """A PEP 503 simple index on disk with one package page linking (relatively) to ``filename``."""
    files = tmp_path / "files"
    files.mkdir()
    (files / filename).write_bytes(payload)
    page = tmp_path / "simple" / "demo-pkg"
    page.mkdir(parents=True)
    (page / "index.html").write_text(
        f'<html><body><a href="../../files/other-0.1.tar.gz#sha256=00">other-0.1.tar.gz</a><br/>'
        f'<a href="../../files/{filename}#sha256=ab">{filename}</a></body></html>')
    return (tmp_path / "simple").as_uri()


def test_sdist_fetched_from_index_without_pip(tmp_path, monkeypatch):
    import hashlib
    import subprocess

    payload = os.urandom(3000)
    filename = "demo-pkg-1.0.tar.gz"
    index = _local_index(tmp_path, payload, filename)
    monkeypatch.setattr(fetch, "index_url", lambda: index)
    # a file:// package page is a directory: serve its index.html, as a web server would
    real_urlopen = urllib.request.urlopen
    monkeypatch.setattr(urllib.request, "urlopen",
                        lambda url, timeout=None: real_urlopen(url + "index.html" if url.endswith("/") else url))
    monkeypatch.setenv("SAFEANCHOR_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("an sdist must not go through pip"))
    good = fetch.Archive("demo-pkg", "1.0", filename, hashlib.sha256(payload).hexdigest(), "test")
    monkeypatch.setitem(fetch.ARCHIVES, "demo", good)
    path = fetch.archive_path("demo")
    assert path == tmp_path / "cache" / "archives" / filename and path.read_bytes() == payload
    # a file whose checksum is not the pinned one is refused and nothing is left behind
    path.unlink()
    monkeypatch.setitem(fetch.ARCHIVES, "demo", fetch.Archive("demo-pkg", "1.0", filename, "0" * 64, "test"))
    with pytest.raises(SafeAnchorError, match="sha256 .* expected 0000"):
        fetch.archive_path("demo")
    assert list((tmp_path / "cache" / "archives").iterdir()) == []
    # a page that does not list the file names it
    monkeypatch.setitem(fetch.ARCHIVES, "demo", fetch.Archive("demo-pkg", "2.0", "demo-pkg-2.0.tar.gz", "0" * 64, "t"))
    with pytest.raises(SafeAnchorError, match="does not list demo-pkg-2.0.tar.gz"):
        fetch.archive_path("demo")


def test_link_from_index_resolves_relative_and_absolute_links():
    html = ('<a href="https://files.example/p/ab/x-1.0.tar.gz#sha256=1">x-1.0.tar.gz</a>'
            '<a href="../../packages/x-1.1.tar.gz">x-1.1.tar.gz</a><a name="x-1.2.tar.gz">no href</a>')
    base = "https://pypi.example/simple/x/"
    assert fetch._link_from_index(html, "x-1.0.tar.gz", base) == "https://files.example/p/ab/x-1.0.tar.gz"
    assert fetch._link_from_index(html, "x-1.1.tar.gz", base) == "https://pypi.example/packages/x-1.1.tar.gz"
    assert fetch._link_from_index(html, "x-1.2.tar.gz", base) is None
    assert fetch._link_from_index(html, "x-1.0.tar", base) is None
