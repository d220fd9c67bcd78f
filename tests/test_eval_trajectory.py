"""`safeanchor eval --run`'s trajectory table: LegalBench's balanced accuracy, composite safety with its
inputs, and a Wilson interval for every proportion of items."""
from safeanchor.suite.cli import trajectory_lines


def _report(score, composite):
    tasks = {"harmbench": {"score": score, "asr": 100 - score, "n": 50},
             "truthfulqa": {"mc1": 20.0, "mc2": 40.0, "n": 30}, "bbq": {"bias": 10.0, "n": 40},
             "legalbench": {"balanced_accuracy": 55.5, "by_task": {}, "n": 64}}
    rep = {"tasks": tasks}
    if composite:
        rep["composite_safety"] = (score + 40.0 + 90.0) / 3
        rep["composite"] = {"formula": "F", "inputs": {
            "harmbench": {"value": score, "metric": "refusal_rate", "judge": {"name": "keyword"}},
            "truthfulqa": {"value": 40.0, "metric": "mc2"}, "bbq_bias": {"value": 10.0, "definition": "abs_amb"}}}
    return rep


def test_trajectory_table_has_legalbench_composite_and_intervals():
    lines = trajectory_lines({"method": "safeanchor", "seed": 0}, ["composite", "legalbench"],
                             [("base", _report(88.0, True)), ("medical", _report(100.0, True))])
    head = lines[2]
    assert "legalbench balanced_accuracy" in head and "composite safety" in head
    assert "harmbench score 95% CI" in head and "harmbench asr 95% CI" in head
    assert lines[4].startswith("| base |") and "| 72.67 |" in lines[4]  # (88 + 40 + 90) / 3
    assert "| 55.50 |" in lines[4] and "[76.20, 94.38]" in lines[4]  # Wilson of 44 / 50
    assert lines[-1] == ("composite safety = F with HarmBench refusal_rate (judge keyword), TruthfulQA mc2, BBQ bias "
                         "(abs_amb).")


def test_trajectory_table_without_composite_is_unchanged_in_shape():
    lines = trajectory_lines({"method": "standard", "seed": 1}, ["truthfulqa"],
                             [("base", {"tasks": {"truthfulqa": {"mc1": 20.0, "mc2": 40.0, "n": 30}}})])
    assert lines[2] == "| after | truthfulqa mc1 | truthfulqa mc2 |" and lines[-1] == "| base | 20.00 | 40.00 |"
