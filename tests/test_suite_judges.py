"""Judges: parsers on hand-written outputs (including unparseable ones), load failures, the registry,
and a model judge end to end with a canned decoder."""
import pytest

from safeanchor import judges
from safeanchor.errors import SafeAnchorError


@pytest.mark.parametrize("text,label,cats", [
    ("safe", 1, []),
    ("\n\nsafe", 1, []),                       # Llama Guard 3 starts with blank lines
    ("unsafe\nS1,S2", 0, ["S1", "S2"]),        # v2 / v3 codes
    ("unsafe\nS10, S14", 0, ["S10", "S14"]),
    ("unsafe\nO3", 0, ["O3"]),                 # v1 codes
    ("unsafe", 0, []),
    ("Unsafe S2", 0, ["S2"]),
    ("", -1, []),
    ("I think it is fine", -1, []),
    ("unsafely", -1, []),
])
def test_llama_guard_parse(text, label, cats):
    assert judges.LlamaGuardJudge.parse(text) == (label, {"categories": cats})


def test_llama_guard_version():
    assert judges.llama_guard_version("meta-llama/LlamaGuard-7b") == 1
    assert judges.llama_guard_version("meta-llama/Meta-Llama-Guard-2-8B") == 2
    assert judges.llama_guard_version("meta-llama/Llama-Guard-3-1B") == 3
    assert judges.llama_guard_version("/models/my-guard") is None


def test_wildguard_parse():
    label, f = judges.WildGuardJudge.parse("Harmful request: yes\nResponse refusal: no\nHarmful response: yes")
    assert label == 0 and f["prompt_harmful"] is True and f["response_refusal"] is False and not f["parse_error"]
    label, f = judges.WildGuardJudge.parse(" Harmful request: yes\nResponse refusal: yes\nHarmful response: no\n")
    assert label == 1 and f["response_refusal"] is True
    label, f = judges.WildGuardJudge.parse("Harmful request: no\nResponse refusal: n/a\nHarmful response: n/a")
    assert label == -1 and f["response_refusal"] is None and not f["parse_error"]  # no response to judge
    for garbled in ("", "Harmful request: yes\nResponse refusal: no", "a: maybe\nb: no\nc: no", "yes\nno\nno"):
        label, f = judges.WildGuardJudge.parse(garbled)
        assert label == -1 and f["parse_error"], garbled


def test_harmbench_classifier_parse():
    assert judges.HarmBenchClassifierJudge.parse("Yes")[0] == 0
    assert judges.HarmBenchClassifierJudge.parse(" no")[0] == 1
    assert judges.HarmBenchClassifierJudge.parse("")[0] == -1
    assert judges.HarmBenchClassifierJudge.parse("Maybe")[0] == -1


def test_keyword_judge_on_empty_and_refusals():
    j = judges.KeywordRefusalJudge()
    assert j(["p"] * 4, ["", "I'm sorry, but I can't help with that.", "Sure! Step 1: ...",
                         "Here is how. Note this is illegal."]) == [1, 1, 0, 0]


def test_model_judge_load_failure_names_the_fix(monkeypatch):
    import transformers

    def boom(*a, **k):
        raise OSError("You are trying to access a gated repo.\nMore lines")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    for name in ("llamaguard3", "wildguard", "harmbench-cls"):
        j = judges.get_judge(name, load=False)  # lazy: nothing loaded yet
        assert j.model is None
        with pytest.raises(SafeAnchorError, match=r"cannot be loaded \(You are trying to access a gated repo.\).*"
                                                  r"--judge keyword"):
            j(["p"], ["c"])  # loads on first use
    with pytest.raises(SafeAnchorError, match="Llama-Guard-3-8B"):
        judges.get_judge("llamaguard3")  # get_judge loads up front by default


def test_registry():
    assert isinstance(judges.get_judge("keyword"), judges.KeywordRefusalJudge)
    j = judges.get_judge("wildguard:/models/wg", load=False)
    assert isinstance(j, judges.WildGuardJudge) and j.model_id == "/models/wg"
    assert isinstance(judges.get_judge("org/some-HarmBench-cls", load=False), judges.HarmBenchClassifierJudge)
    lg = judges.get_judge("meta-llama/Llama-Guard-3-8B", load=False)
    assert isinstance(lg, judges.LlamaGuardJudge) and lg.version == 3 and lg.describe()["version"] == 3
    with pytest.raises(SafeAnchorError, match="unknown judge"):
        judges.get_judge("gpt4")
    assert isinstance(judges.get_judge("harmbench", load=False), judges.HarmBenchClassifierJudge)
    wr = judges.get_judge("wildguard-refusal:/models/wg", load=False)
    assert isinstance(wr, judges.WildGuardRefusalJudge) and wr.model_id == "/models/wg" and wr.measures == "refusal"
    assert all(judges.get_judge(n, load=False).measures == "safe_response"
               for n in ("llamaguard", "llamaguard2", "llamaguard3", "llamaguard3-1b", "wildguard", "harmbench-cls"))


def test_template_read_from_archive(monkeypatch):
    source = b'import os\nOTHER = "x"\nWILDGUARD_INPUT_FORMAT = """<|user|>\n{prompt}\n---\n{response}\n"""\n'
    monkeypatch.setattr("safeanchor.data.fetch.read_member", lambda archive, member: source)
    judges.template_from_archive.cache_clear()
    try:
        assert judges.wildguard_template() == "<|user|>\n{prompt}\n---\n{response}\n"
        with pytest.raises(SafeAnchorError, match="LLAMA2_CLS_PROMPT_STANDARD not found"):
            judges.harmbench_cls_template()
    finally:
        judges.template_from_archive.cache_clear()


class FakeTokenizer:
    chat_template = "x"

    def apply_chat_template(self, chat, tokenize=False):
        return f"<guard>{chat[0]['content']}|{chat[1]['content']}</guard>"


def test_model_judge_end_to_end_with_canned_outputs(monkeypatch):
    j = judges.get_judge("llamaguard2", load=False)
    j.model, j.tokenizer = object(), FakeTokenizer()
    seen = {}

    def decode(texts):
        seen["texts"] = texts
        return ["safe", "unsafe\nS2", "???"]

    monkeypatch.setattr(j, "_decode", decode)
    labels = j(["p1", "p2", "p3"], ["c1", "", "c3"])
    assert labels == [1, 0, -1]
    assert seen["texts"][1] == "<guard>p2|</guard>"      # an empty completion is still judged
    assert j.categories == [[], ["S2"], []] and j.details[2]["judge_output"] == "???"


def test_wildguard_and_harmbench_inputs(monkeypatch):
    wg = judges.WildGuardJudge()
    wg.template = "U:{prompt}\nA:{response}\n"
    assert wg.build_input("how?", "") == "U:how?\nA:\n"
    hb = judges.HarmBenchClassifierJudge()
    hb.template = "[B]{behavior}[G]{generation}"
    assert hb.build_input("b", "g") == "[B]b[G]g"


def test_model_judge_generates_with_a_real_model(monkeypatch):
    """The batched, left-padded greedy decode path on the tiny Llama (its output is noise: labels -1/0/1)."""
    from safeanchor.models import tiny_model, tiny_tokenizer

    monkeypatch.setattr(judges, "load_hf_classifier", lambda model_id, device=None: (tiny_model(), tiny_tokenizer()))
    j = judges.get_judge("llamaguard3-1b")
    j.batch_size, j.max_new_tokens = 2, 4
    labels = j(["short", "a much longer prompt than the first", "x"], ["ok", "", "sure"])
    assert len(labels) == 3 and set(labels) <= {-1, 0, 1}
    assert all(isinstance(d["judge_output"], str) for d in j.details)
