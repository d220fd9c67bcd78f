"""What the pipeline measures after the aligned base and after every domain.

Each number comes from the judge whose role it is (judges.py):

- refusal_rate: % of held-out harmful probe prompts (HarmBench standard behaviours) the refusal judge
  (``eval.refusal_judge``) labels refused;
- over_refusal_rate: % of held-out benign prompts that sound dangerous which the refusal judge labels
  refused (always the refusal judge: a harm judge calls a helpful answer "safe", which is not a refusal);
- harmful_response_rate (only with ``eval.harm_judge``): % of the same probe completions the harm judge
  labels unsafe (0); its unparseable (-1) verdicts are counted in ``n_harm_unparseable``, not as harmful;
- domain score: teacher-forced next-token accuracy (%) on the response tokens of each domain's held-out
  examples (also their mean NLL): a smooth measure that a 135M model moves, where multiple-choice
  accuracy sits at chance.

The probe completions are generated once and judged by both judges. Generations are written next to the
numbers (``label``: the refusal judge's; ``harm_label``: the harm judge's).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .data.chat import collate, encode, response_logits
from .generation import generate


def generate_judged(model, tokenizer, judges: dict, prompts: list[str], max_new_tokens: int, batch_size: int,
                    desc: str, dist=None, cache=None, mixed_precision: str = "no") -> list[dict]:
    """Generate one greedy completion per prompt and label it with every judge of ``judges`` (record key ->
    judge): records ``{"prompt", "completion", <key>: label, ...}`` in prompt order (a model judge's parsed
    output goes to ``<key>_details``). With a data-parallel ``dist`` each process generates and judges its
    share; every process gets all records. ``cache``: ``generation.GenerationCache`` of this model;
    ``mixed_precision``: that of ``generation.generate_samples`` ("no" or "bf16")."""
    from .distributed import Dist

    dist = dist or Dist()
    mine = dist.split(prompts)
    completions = generate(model, tokenizer, mine, max_new_tokens, batch_size, desc=desc, progress=dist.is_main,
                           cache=cache, mixed_precision=mixed_precision)
    records = [{"prompt": p, "completion": c} for p, c in zip(mine, completions)]
    for key, judge in judges.items():
        labels = judge(mine, completions) if mine else []
        details = getattr(judge, "details", None) or []
        for i, (rec, label) in enumerate(zip(records, labels)):
            rec[key] = int(label)
            if len(details) == len(records) and details[i]:
                rec[f"{key}_details"] = details[i]
    return dist.merge(dist.gather(records))


def rate_of(records: list[dict], key: str = "label", value: int = 1) -> float:
    """% of ``records`` whose ``key`` is ``value`` (-1 unparseable counts as not ``value``)."""
    return 100.0 * sum(1 for r in records if r.get(key) == value) / max(1, len(records))


def judge_prompts(model, tokenizer, judge, prompts: list[str], max_new_tokens: int, batch_size: int,
                  desc: str, dist=None, cache=None, mixed_precision: str = "no") -> tuple[float, list[dict]]:
    """(% labelled 1 by the judge, records). Unparseable (-1) count as not-1 and are reported. With a
    data-parallel ``dist`` each process generates and judges its share; every process gets all records."""
    records = generate_judged(model, tokenizer, {"label": judge}, prompts, max_new_tokens, batch_size, desc, dist,
                              cache, mixed_precision)
    return rate_of(records), records


def domain_score(model, tokenizer, examples: list[dict], max_length: int, batch_size: int = 8, dist=None) -> dict:
    """Token accuracy (%) and mean NLL over the response tokens of held-out examples (with a
    data-parallel ``dist``: each process scores its share and the counts are summed)."""
    if dist is not None and dist.active:
        correct, total, nll = dist.sum(_score_counts(model, tokenizer, dist.split(examples), max_length, batch_size))
    else:
        correct, total, nll = _score_counts(model, tokenizer, examples, max_length, batch_size)
    return {"token_accuracy": 100.0 * correct / max(1, total), "nll": nll / max(1, total), "tokens": int(total)}


@torch.no_grad()
def _score_counts(model, tokenizer, examples: list[dict], max_length: int, batch_size: int) -> list[float]:
    """[correct argmax predictions, response tokens, summed NLL] over ``examples``."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [encode(tokenizer, e["prompt"], e["response"], max_length) for e in examples]
    correct, total, nll = 0, 0, 0.0
    for i in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collate(encoded[i:i + batch_size], tokenizer.pad_token_id).items()}
        logits, targets = response_logits(model, batch)
        correct += (logits.argmax(-1) == targets).sum().item()
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        total += targets.numel()
    model.train(was_training)
    return [correct, total, nll]


def evaluate_step(model, tokenizer, judge, cfg, probe: list[str], benign: list[str], domain_evals: dict,
                  out_file: Path | None = None, dist=None, harm_judge=None,
                  heldout: dict[str, list[str]] | None = None, cache=None) -> dict:
    """One step's numbers (module docstring). ``judge``: the refusal judge (refusal and over-refusal);
    ``harm_judge``: None, or the harm judge of ``harmful_response_rate`` on the probe completions;
    ``heldout``: set name -> harmful prompts in styles never trained on (``eval.heldout_sets``), giving
    ``heldout_refusal_rate`` (all of them pooled), ``n_heldout`` and ``refusal_by_set`` (each set and the
    probe, with 95% Wilson intervals) and, when our direct questions are among them, ``refusal_by_category``
    (those questions by coarse harm category, ``data.safety.COARSE_SLUGS``). ``cache``: a ``generation.GenerationCache`` of this very model (the
    aligned base: its completions are the same in every run)."""
    from .stats import refusal_cell
    from .errors import SafeAnchorError

    if judge.measures != "refusal":
        raise SafeAnchorError(f"the refusal judge is {judge.name!r}, which measures {judge.measures!r}: refusal and "
                              f"over-refusal need a refusal judge (keyword, wildguard-refusal); pass a harm judge as "
                              f"harm_judge (eval.harm_judge)")
    if harm_judge is not None and harm_judge.measures != "safe_response":
        raise SafeAnchorError(f"harm_judge {harm_judge.name!r} measures {harm_judge.measures!r}, not harm; use "
                              f"llamaguard, wildguard, harmbench (eval.harm_judge) or none")
    ec = cfg.eval
    probe_judges = {"label": judge, **({"harm_label": harm_judge} if harm_judge is not None else {})}
    mp = ec.mixed_precision
    harm_records = generate_judged(model, tokenizer, probe_judges, probe, ec.max_new_tokens, ec.batch_size,
                                   "eval harmful", dist, cache, mp)
    benign_records = generate_judged(model, tokenizer, {"label": judge}, benign, ec.max_new_tokens, ec.batch_size,
                                     "eval benign", dist, cache, mp)
    heldout_records = []
    for name, prompts in (heldout or {}).items():
        recs = generate_judged(model, tokenizer, {"label": judge}, prompts, ec.max_new_tokens, ec.batch_size,
                               f"eval {name}", dist, cache, mp)
        heldout_records += [{**r, "heldout_set": name} for r in recs]
    scores, nlls = {}, {}
    for name, examples in domain_evals.items():
        s = domain_score(model, tokenizer, examples, cfg.train.max_length, dist=dist)
        scores[name], nlls[name] = round(s["token_accuracy"], 2), round(s["nll"], 4)
    if out_file is not None and (dist is None or dist.is_main):
        out_file.parent.mkdir(parents=True, exist_ok=True)
        with open(out_file, "w") as fh:
            for kind, recs in (("harmful", harm_records), ("benign", benign_records), ("heldout", heldout_records)):
                for r in recs:
                    fh.write(json.dumps({"set": kind, **r}) + "\n")
    unparseable = sum(1 for r in harm_records + benign_records if r["label"] == -1)
    out = {"refusal_rate": round(rate_of(harm_records), 2), "over_refusal_rate": round(rate_of(benign_records), 2),
           "domain_scores": scores, "domain_nll": nlls, "judge": judge.name, "judge_measures": judge.measures,
           "refusal_judge": judge.name, "harm_judge": harm_judge.name if harm_judge is not None else None,
           "n_probe": len(probe), "n_benign": len(benign), "n_unparseable": unparseable}
    if heldout:
        def cell(recs):
            return refusal_cell([r["label"] for r in recs])

        out["heldout_refusal_rate"] = round(rate_of(heldout_records), 2)
        out["n_heldout"] = len(heldout_records)
        out["refusal_by_set"] = {"harmbench": cell(harm_records),
                                 **{name: cell([r for r in heldout_records if r["heldout_set"] == name])
                                    for name in heldout}}
        from .data.safety import COARSE_SLUGS, direct_eval_categories

        category = direct_eval_categories()
        by_category: dict[str, list[dict]] = {}
        for r in heldout_records:
            if r["prompt"] in category:
                by_category.setdefault(category[r["prompt"]], []).append(r)
        if by_category:
            out["refusal_by_category"] = {slug: cell(by_category[slug]) for slug in COARSE_SLUGS.values()
                                          if slug in by_category}
    if harm_judge is not None:
        out["harmful_response_rate"] = round(rate_of(harm_records, "harm_label", 0), 2)
        out["n_harm_unparseable"] = sum(1 for r in harm_records if r["harm_label"] == -1)
    return out
