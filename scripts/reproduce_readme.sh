#!/usr/bin/env bash
# Every number in the README and docs/ (results.md, benchmarks.md, distributed.md, evaluation.md), in the
# order they were produced (2-core CPU: the whole script takes several hours; each stage resumes if
# rerun). Stages: STAGES="align quickstart example compare ..."
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
SA=.venv/bin/safeanchor
STAGES=${STAGES:-"align quickstart orders orders-bf16 grid6 adaptive t5 t10 eight decoder capacity protect random-basis parts refresh categories example compare ablation spectrum suite overhead"}
METHODS=standard,safeanchor,safegrad,interleave,ewc,vaccine,olora,safelora
for stage in $STAGES; do
  case $stage in
    align)     # retrain the alignment stage and export it (the quick start merges the committed copy instead)
               $SA align --preset quickstart --export src/safeanchor/artifacts/smollm2-align ;;
    quickstart) # the README's headline table (bash scripts/quickstart.sh runs the same, standard first)
               $SA run --preset quickstart --method safeanchor,standard --out runs/quickstart ;;
    orders)    # the README's per-step check: both orders x 2 seeds x {standard, safeanchor}, two runs at a time
               # (the README's Standard runs are from runs/orders, made before the quick start's monitor
               # changed; Standard reads neither the monitor nor the repair settings)
               $SA run --preset quickstart --method standard,safeanchor --seed 0,1 --jobs 2 \
                 --orderings "medical,legal,code;code,legal,medical" --out runs/orders2 ;;
    orders-bf16) # the same grid with the evaluation's generation under bf16 autocast (eval.mixed_precision)
               $SA run --preset quickstart --method standard,safeanchor --seed 0,1 --jobs 2 \
                 --orderings "medical,legal,code;code,legal,medical" --set eval.mixed_precision=bf16 --out runs/bf16-orders ;;
    grid6)     # docs/results.md's Zen 4 grid: every ordering at seed 0, five of them at seed 1, two runs at a time
               # (each run starts from the finished prefix another ordering shares: --reuse-prefix, automatic here)
               $SA run --preset quickstart --method standard,safeanchor --seed 0 --jobs 2 --orderings all --out runs/grid6
               $SA run --preset quickstart --method standard,safeanchor --seed 1 --jobs 2 --out runs/grid6 --orderings \
                 "medical,legal,code;medical,code,legal;legal,medical,code;code,medical,legal;code,legal,medical"
               $SA compare runs/grid6/*-seed? --out runs/grid6-cmp ;;
    adaptive)  # the same two orders x 2 seeds with the over-refusal monitor and the adaptive repair mix
               $SA run --preset quickstart --method safeanchor --seed 0,1 --jobs 2 \
                 --orderings "medical,legal,code;code,legal,medical" --set method_options.safeanchor.overrefusal_monitor=60 \
                 --set method_options.safeanchor.repair_mix=adaptive --out runs/adaptive
               $SA compare runs/adaptive/safeanchor-*-seed? runs/grid6/standard-{medical_legal_code,code_legal_medical}-seed? \
                 --out runs/adaptive-cmp ;;
    t5)        # five domains (T = 5), seed 0, both methods side by side (bf16 where the CPU has it: the preset's auto)
               $SA run --preset quickstart --method standard,safeanchor --seed 0 --jobs 2 \
                 --set "data.domains=[medical,legal,code,biomed,math]" --out runs/t5 ;;
    t10)       # ten domains (T = 10), seed 0: the T = 5 runs plus five more domains (--reuse-prefix), one run at a time
               for m in standard safeanchor; do
                 $SA run --preset quickstart --method $m --seed 0 --reuse-prefix runs/t5 --out runs/t10/$m-seed0 \
                   --set "data.domains=[medical,legal,code,biomed,math,science,openbook,commonsense,algebra,numbers]"
               done
               $SA analyze capacity runs/t10/*-seed0 --out runs/capacity-t10 ;;
    capacity)  # basis size, update share removed, plasticity and retention per domain position
               $SA analyze capacity runs/orders2/safeanchor-*-seed* runs/orders/standard-*-seed* --out runs/capacity-t3
               $SA analyze capacity runs/grid6/*-seed? --out runs/capacity-grid6
               $SA analyze capacity runs/t5/*-seed0 --out runs/capacity-t5 ;;
    protect)   # does protecting one harm category's subspace protect the others? (medical only, CSM off)
               for c in all violence non-violent-crimes; do
                 src=offline; [ $c != all ] && src=offline:$c
                 $SA run --preset quickstart --method safeanchor --set "data.domains=[medical]" \
                   --set data.safety_source=$src --set method_options.safeanchor.csm=false \
                   --set eval.mixed_precision=bf16 --set eval.heldout_size=160 --out runs/protect-$c
               done
               $SA run --preset quickstart --method standard --set "data.domains=[medical]" \
                 --set eval.mixed_precision=bf16 --set eval.heldout_size=160 --out runs/protect-none ;;
    random-basis) # does the Fisher information matter? SafeAnchor with a random basis of the same sizes, 2 seeds
               $SA run --preset quickstart --method safeanchor --seed 0,1 --jobs 2 \
                 --set method_options.safeanchor.basis=random --out runs/ablation-random ;;
    parts)     # which part protects, 2 seeds each on this base: the anchor alone, CSM alone
               $SA run --preset quickstart --method safeanchor --seed 0,1 --jobs 2 \
                 --set method_options.safeanchor.project=none --set method_options.safeanchor.csm=false \
                 --out runs/ablation-anchor-only
               $SA run --preset quickstart --method safeanchor --seed 0,1 --jobs 2 \
                 --set method_options.safeanchor.project=none --set method_options.safeanchor.gamma=0 \
                 --out runs/ablation-csm-only ;;
    refresh)   # the Fisher subspace refreshed after steps 10 and 20 of each domain, 2 seeds, against the grid's M -> L -> C
               for k in 0 1; do
                 $SA run --preset quickstart --method safeanchor --seed $k --set "data.domains=[medical,legal,code]" \
                   --set method_options.safeanchor.refresh_every=10 --out runs/refresh/safeanchor-refresh10-seed$k
               done
               mkdir -p runs/refresh-cmp-in
               for k in 0 1; do
                 ln -sfn ../grid6/safeanchor-medical_legal_code-seed$k runs/refresh-cmp-in/full-seed$k
                 ln -sfn ../refresh/safeanchor-refresh10-seed$k runs/refresh-cmp-in/refresh10-seed$k
                 ln -sfn ../grid6/standard-medical_legal_code-seed$k runs/refresh-cmp-in/standard-seed$k
               done
               $SA compare --by-dir runs/refresh-cmp-in/* --out runs/refresh-cmp ;;
    categories) # one safety subspace per coarse harm category at the aligned base
               $SA analyze category-subspaces --preset quickstart --per-category 32 --out runs/category-subspaces ;;
    example)   # SafeAnchor in a user's own TRL SFTTrainer script, and the same script without it
               .venv/bin/python examples/sft_with_safeanchor.py --output_dir runs/example-safeanchor --max_steps 30 --domain medical
               .venv/bin/python examples/sft_with_safeanchor.py --output_dir runs/example-plain --max_steps 30 --domain medical --no-safeanchor ;;
    eight)     # the six baselines on the current base (seed 0; Standard and SafeAnchor are the grid's M -> L -> C runs), then GCG after code for all eight and the base
               for m in safegrad interleave ewc vaccine olora safelora; do
                 $SA run --preset quickstart --method $m --seed 0 --out runs/eight/$m-seed0
               done
               for r in runs/grid6/standard-medical_legal_code-seed0 runs/grid6/safeanchor-medical_legal_code-seed0 runs/eight/*-seed0; do
                 $SA eval --run $r --tasks gcg --steps last --set gcg.preset=cpu --limit 8
               done
               $SA eval --model runs/grid6/standard-medical_legal_code-seed0/base_model --tasks gcg --set gcg.preset=cpu \
                 --limit 8 --out runs/eight/gcg-base
               $SA compare runs/grid6/standard-medical_legal_code-seed0 runs/grid6/safeanchor-medical_legal_code-seed0 \
                 runs/eight/*-seed0 --out runs/eight-cmp
               # 16 prompts for the two leaders, resuming from their 8 finished attacks
               for r in runs/grid6/safeanchor-medical_legal_code-seed0 runs/eight/safegrad-seed0; do
                 m=$(basename $r | cut -d- -f1); mkdir -p runs/eight/gcg16/$m/3-code/gcg
                 cp $r/suite/3-code/gcg/records.jsonl runs/eight/gcg16/$m/3-code/gcg/
                 $SA eval --run $r --tasks gcg --steps last --set gcg.preset=cpu --limit 16 --out runs/eight/gcg16/$m
               done
               # seed 1 (the README's two-seed table; GCG on seed 1 of every method)
               for m in safegrad interleave olora ewc safelora vaccine; do
                 $SA run --preset quickstart --method $m --seed 1 --out runs/eight/$m-seed1
               done
               for r in runs/grid6/standard-medical_legal_code-seed1 runs/grid6/safeanchor-medical_legal_code-seed1 \
                        runs/eight/{safegrad,interleave,olora,ewc,safelora,vaccine}-seed1; do
                 $SA eval --run $r --tasks gcg --steps last --set gcg.preset=cpu --limit 8
               done
               $SA compare runs/grid6/{standard,safeanchor}-medical_legal_code-seed{0,1} runs/eight/*-seed{0,1} \
                 --out runs/eight2-cmp ;;
    decoder)   # the greedy decoder's benchmark, then one SafeAnchor run (the old-code run needs a checkout of 8fbe322)
               .venv/bin/python benchmarks/greedy_decoder.py --threads 1 \
                 --adapter runs/grid6/standard-medical_legal_code-seed0/adapters/3-code
               $SA run --preset quickstart --method safeanchor --seed 0 --out runs/decoder/new-safeanchor-seed0 ;;
    compare)   # all eight methods, two seeds, two runs at a time (the previous base's table)
               $SA run --preset quickstart --method $METHODS --seed 0 --jobs 2 --out runs/compare
               $SA run --preset quickstart --method $METHODS --seed 1 --jobs 2 --out runs/compare
               $SA compare runs/compare/*-seed* --out runs/compare ;;
    ablation)  # SafeAnchor's parts (seed 0); "full" is runs/compare/safeanchor-seed0
               o=method_options.safeanchor
               $SA run --preset quickstart --method safeanchor --seed 0 --out runs/ablation/osca-only \
                 --set $o.gamma=0 --set $o.csm=false
               $SA run --preset quickstart --method safeanchor --seed 0 --out runs/ablation/osca-anchor \
                 --set $o.csm=false
               $SA run --preset quickstart --method safeanchor --seed 0 --out runs/ablation/paper-literal-nocsm \
                 --set $o.project=gradient --set $o.anchor_projected=true --set $o.merge=union --set $o.csm=false
               $SA run --preset quickstart --method safeanchor --seed 0 --out runs/ablation/full-anchor-through-update \
                 --set $o.anchor_projected=true
               $SA run --preset quickstart --method safeanchor --seed 0 --out runs/ablation/paper-csm \
                 --set $o.repair_check_every=0 --set $o.repair_lookalikes=0
               $SA compare --by-dir runs/compare/standard-seed0 runs/ablation/*/ runs/compare/safeanchor-seed0 \
                 --out runs/ablation ;;
    spectrum)  $SA spectrum --preset quickstart --out runs/spectrum ;;
    suite)     # HumanEval after every step; GCG on the aligned base (CPU budget)
               $SA eval --run runs/compare/standard-seed0 --tasks humaneval --limit 40 --out runs/suite/standard-humaneval
               $SA eval --model runs/compare/standard-seed0/base_model --tasks gcg --set gcg.preset=cpu \
                 --limit 12 --out runs/suite/gcg-aligned
               $SA eval --model runs/compare/standard-seed0/base_model --tasks harmbench,truthfulqa,bbq,mmlu,medqa,legalbench,composite \
                 --limit 300 --out runs/suite/aligned-base ;;
    overhead)  .venv/bin/python benchmarks/safeanchor_overhead.py
               .venv/bin/python benchmarks/safeanchor_overhead.py --bf16
               .venv/bin/python benchmarks/ssi_scale.py
               .venv/bin/python benchmarks/data_parallel.py --steps 5
               for m in safegrad safeanchor; do
                 .venv/bin/python benchmarks/data_parallel.py --steps 5 --method $m --out benchmarks/results/data_parallel_$m.json
               done ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
done
