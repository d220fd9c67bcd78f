"""What the pipeline measures after the aligned base and after every domain.

refusal_rate: % of held-out harmful probe prompts (HarmBench standard behaviours) the judge labels
1 (refused / safe). over_refusal_rate: % of held-out benign prompts that sound dangerous which are
refused. domain score: teacher-forced next-token accuracy (%) on the response tokens of each
domain's held-out examples (also their mean NLL): a smooth measure that a 135M model moves, where
multiple-choice accuracy sits at chance. Generations are written next to the numbers.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from .data.chat import collate, encode, response_logits
from .generation import generate


def judge_prompts(model, tokenizer, judge, prompts: list[str], max_new_tokens: int, batch_size: int,
                  desc: str, dist=None) -> tuple[float, list[dict]]:
    """(% labelled 1 by the judge, records). Unparseable (-1) count as not-1 and are reported. With a
    data-parallel ``dist`` each process generates and judges its share; every process gets all records."""
    from .distributed import Dist

    dist = dist or Dist()
    mine = dist.split(prompts)
    completions = generate(model, tokenizer, mine, max_new_tokens, batch_size, desc=desc, progress=dist.is_main)
    labels = judge(mine, completions) if mine else []
    records = dist.merge(dist.gather([{"prompt": p, "completion": c, "label": lbl}
                                      for p, c, lbl in zip(mine, completions, labels)]))
    rate = 100.0 * sum(1 for r in records if r["label"] == 1) / max(1, len(records))
    return rate, records


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
                  out_file: Path | None = None, dist=None) -> dict:
    ec = cfg.eval
    refusal, harm_records = judge_prompts(model, tokenizer, judge, probe, ec.max_new_tokens, ec.batch_size,
                                          "eval harmful", dist)
    over, benign_records = judge_prompts(model, tokenizer, judge, benign, ec.max_new_tokens, ec.batch_size,
                                         "eval benign", dist)
    scores, nlls = {}, {}
    for name, examples in domain_evals.items():
        s = domain_score(model, tokenizer, examples, cfg.train.max_length, dist=dist)
        scores[name], nlls[name] = round(s["token_accuracy"], 2), round(s["nll"], 4)
    if out_file is not None and (dist is None or dist.is_main):
        out_file.parent.mkdir(parents=True, exist_ok=True)
        with open(out_file, "w") as fh:
            for kind, recs in (("harmful", harm_records), ("benign", benign_records)):
                for r in recs:
                    fh.write(json.dumps({"set": kind, **r}) + "\n")
    unparseable = sum(1 for r in harm_records + benign_records if r["label"] == -1)
    return {"refusal_rate": round(refusal, 2), "over_refusal_rate": round(over, 2), "domain_scores": scores,
            "domain_nll": nlls, "judge": judge.name, "judge_measures": judge.measures, "n_probe": len(probe),
            "n_benign": len(benign), "n_unparseable": unparseable}
