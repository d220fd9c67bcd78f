"""The hub domains of the paper presets, on fixture files written by us in the hub datasets' real schemas
(tests/data/hub/, see tests/data/README.md), read by the real ``datasets`` library: ``load_dataset`` is
routed from the hub ids / hf:// paths to the local files, so nothing touches the network.

- MedQA (GBaker/MedQA-USMLE-4-options-hf): rendered like the offline medical domain, NOT length-filtered.
- CodeAlpaca (sahil2801/CodeAlpaca-20k): instruction + input -> output, repeated prompts dropped.
- LegalBench (nguha/legalbench): its per-task TSV files through the packaged csv builder, never the
  repository's loading script (which datasets >= 3 refuses); the parquet export second.
- a domain smaller than asked for says so, with the count.
"""
import re
from pathlib import Path

import pytest

from safeanchor.data import domains
from safeanchor.data.domains import DomainSizeWarning, get_domain
from safeanchor.errors import SafeAnchorError

datasets = pytest.importorskip("datasets")
HUB = Path(__file__).parent / "data" / "hub"
REAL_LOAD = datasets.load_dataset


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """datasets.load_dataset -> the fixture files; records every call; the loading-script repo is refused."""
    real = REAL_LOAD
    calls = []

    def local(path: str) -> str:
        m = re.fullmatch(r"hf://datasets/nguha/legalbench(@[^/]+)?/(?:data/)?(.+)", path)
        assert m, path
        return str(HUB / "legalbench" / m.group(2))

    def fake(path, name=None, **kw):
        calls.append((path, name, kw))
        cache = str(tmp_path / "hf-cache")
        if path == "GBaker/MedQA-USMLE-4-options-hf":
            return real("json", data_files={s: str(HUB / f"medqa_4options_schema_selfwritten_{s}.jsonl")
                                            for s in ("train", "test")}, cache_dir=cache)
        if path == "sahil2801/CodeAlpaca-20k":
            return real("json", data_files={"train": str(HUB / "codealpaca_schema_selfwritten.json")}, cache_dir=cache)
        if path == "nguha/legalbench":
            raise RuntimeError("Dataset scripts are no longer supported, but found legalbench.py")
        if path in ("csv", "parquet") and kw.get("data_files"):
            files = {s: local(p) for s, p in kw.pop("data_files").items()}
            if fake.fail_csv and path == "csv":
                raise FileNotFoundError(f"{kw} no such file")
            return real(path, data_files=files, cache_dir=cache, **kw)
        raise ConnectionError(f"unexpected hub call {path!r}")

    fake.fail_csv = False
    monkeypatch.setattr(datasets, "load_dataset", fake)
    fake.calls = calls
    return fake


def test_medqa_rows_rendered_and_not_length_filtered(hub):
    d = get_domain("hub:medqa")
    assert d.on_hub and d.available("train") == 3 and d.available("eval") == 1
    train = d.load("train", 3)
    assert {"prompt": "Which vitamin deficiency causes scurvy?\nA. Vitamin A\nB. Vitamin C\nC. Vitamin D\n"
                      "D. Vitamin K\nAnswer with the letter of the correct option.",
            "response": "The answer is (B) Vitamin C."} in train
    long = [e for e in train if "CT pulmonary angiography" in e["prompt"]]
    assert len(long) == 1 and len(long[0]["prompt"].split()) > domains.MAX_WORDS  # kept whole
    assert long[0]["response"] == "The answer is (A) CT pulmonary angiography."
    assert d.load("eval", 5) == [{"prompt": "Which nerve innervates the diaphragm?\nA. Vagus\nB. Phrenic\nC. Radial\n"
                                            "D. Median\nAnswer with the letter of the correct option.",
                                  "response": "The answer is (B) Phrenic."}]


def test_a_short_domain_says_how_many_it_has(hub):
    with pytest.warns(DomainSizeWarning, match=r"domain 'hub:medqa' has 3 usable train examples, fewer than the "
                                               r"5,000 asked for \(data.examples_per_domain\): using all 3"):
        assert len(get_domain("hub:medqa").load("train", 5000)) == 3
    with pytest.warns(DomainSizeWarning, match=r"'code' has 336 usable train examples.*over 150 words"):
        get_domain("code").load("train", 5000)


def test_codealpaca_instruction_and_input(hub):
    d = get_domain("hub:codealpaca")
    rows = list(d.loader("train") + d.loader("eval"))  # all rows, whichever split their hash puts them in
    prompts = [r["prompt"] for r in rows]
    assert len(rows) == 4 and len(set(prompts)) == 4  # the repeated instruction is dropped
    assert {"prompt": "Reverse the given list.\n[1, 2, 3]", "response": "[3, 2, 1]"} in rows
    assert {"prompt": "Write a Python function that returns the square of a number.",
            "response": "def square(x):\n    return x * x"} in rows  # the first of the repeats is kept


def test_legalbench_reads_the_task_files_not_the_loading_script(hub):
    d = get_domain("hub:legalbench/privacy_policy_qa")
    rows = list(d.loader("train") + d.loader("eval"))
    assert len(rows) == 7  # 5 test + 2 train rows
    assert {"prompt": "question: how long do you keep my data?\ntext: Our app uses \"dark mode\" by default, which you "
                      "can change in settings.", "response": "Irrelevant"} in rows
    assert all(r["response"] in ("Relevant", "Irrelevant") for r in rows)
    (path, name, kw), = [c for c in hub.calls if c[0] == "csv"]
    assert kw["sep"] == "\t"
    assert not [c for c in hub.calls if c[0] == "nguha/legalbench"]


def test_legalbench_parquet_export_second(tmp_path, monkeypatch):
    """When the TSV files cannot be read, the parquet export (<task>/<split>/0000.parquet) is."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    for split in ("train", "test"):
        table = pcsv.read_csv(HUB / "legalbench" / "privacy_policy_qa" / f"{split}.tsv",
                              parse_options=pcsv.ParseOptions(delimiter="\t"))
        out = tmp_path / "pq" / "privacy_policy_qa" / split
        out.mkdir(parents=True)
        pq.write_table(table, out / "0000.parquet")
    monkeypatch.setattr(domains, "LEGALBENCH_PARQUET", str(tmp_path / "pq" / "{task}" / "{split}" / "0000.parquet"))
    seen = []

    def route(path, name=None, **kw):
        seen.append(path)
        if path == "parquet":
            return REAL_LOAD("parquet", data_files=kw["data_files"], cache_dir=str(tmp_path / "cache"))
        raise FileNotFoundError("data/privacy_policy_qa/train.tsv")

    monkeypatch.setattr(datasets, "load_dataset", route)
    d = get_domain("hub:legalbench/privacy_policy_qa")
    assert len(d.loader("train") + d.loader("eval")) == 7 and seen == ["csv", "parquet"]


def test_legalbench_unreachable_names_both_forms(monkeypatch):
    def offline(path, name=None, **kw):
        raise ConnectionError("Couldn't reach 'https://huggingface.co'")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SafeAnchorError, match=r"LegalBench task 'privacy_policy_qa'.*data/privacy_policy_qa/\{train,"
                                              r"test\}.tsv: Couldn't reach.*parquet export: Couldn't reach") as exc:
        get_domain("hub:legalbench/privacy_policy_qa").load("train", 2)
    assert "\n" not in str(exc.value)


def test_offline_domains_keep_the_length_filter():
    rows = get_domain("medical").loader("train")
    assert all(len(r["prompt"]) + len(r["response"]) <= domains.MAX_CHARS for r in rows)
