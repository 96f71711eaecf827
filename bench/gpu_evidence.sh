#!/usr/bin/env bash
# The GPU measurements behind the README's "needs a GPU" figures, one part per command of at most 10 minutes.
#
#   bash bench/gpu_evidence.sh PART [OUT]      # OUT defaults to $OUT, else ./out
#
# Parts:
#   check     pytest's GPU tests (bf16 sampler copy, compiled decode step) + the two speed benches (cpu_speed --gpu, eval_throughput)
#   coresets  random / k-centers / herding x mean / cls features at DPC 5/10/20 (20 sets; herding 10 seeds)
#   dilm      `dilm distill --preset gpu` on SST-2, evaluated (10 sets x DPC 5/10/20, minilm-l6, 5 seeds)
#   vanilla   the same with outer_loops=0: no matching stage (the ablation DiLM must beat)
#   sweep     `dilm sweep --config sweeps/gpu-quick.yaml` (4 trials at once sharing the GPU with the eval actor)
#   softlabel hard vs learned soft vs smoothing (same confidence) vs teacher probe, paired 95 % intervals: SST-2
#             DPC 10, 20 sets x 5 seeds of random / k-centers and of the dilm / vanilla parts' sets (run those
#             first; their 10 sets per DPC are what exists), on minilm-l6, TF-IDF and the proxy (learned step)
#   softlabel-smollm2  the same sets and labelings on the SmolLM2-135M classifier and TF-IDF
#   softlabel-fewer    AG News with 2 and 3 examples in total (fewer than its 4 classes) + TDD at DPC 1
# PRESET=smoke EVAL_ARCH=tfidf-logreg bash bench/gpu_evidence.sh dilm /tmp/ev   checks that plumbing on a CPU.
# On a lent GPU machine whose packages are staged under /root/site, prefix with: export PYTHONPATH=/root/site:$PWD;
# At most 8 files come back from the lent machine, so each part leaves there only: $part.log (everything
# printed), its JSON results, $part-gpu-util.csv (utilisation every 5 s) and, for distillations, a tarball of the
# sets with their provenance and scores. Bulky state (checkpoints, sweep storage) stays in $WORK.
set -euo pipefail
part=${1:?usage: bash bench/gpu_evidence.sh check|coresets|dilm|vanilla|sweep|softlabel|softlabel-smollm2|softlabel-fewer [OUT]}
out=${2:-${OUT:-out}}
work=${WORK:-/tmp/dilm-evidence}
mkdir -p "$out" "$work"
py=${PYTHON:-python}
log="$out/$part.log"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$log" 2>&1 || echo "no nvidia-smi" > "$log"
nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > "$out/$part-gpu-util.csv" 2>&1 &
mon=$!
trap 'kill $mon 2>/dev/null || true' EXIT
start=$(date +%s)
quiet() { grep -v -e Warning -e 'warnings.warn' -e 'attn_output =' -e '%|' || true; }
case $part in
  check)
    $py -m pytest -q -m gpu tests/dilm/test_sampling.py 2>&1 | tail -3 | tee -a "$log"
    $py bench/cpu_speed.py --gpu --json "$out/speed.json" 2>&1 | quiet | tee -a "$log"
    $py bench/eval_throughput.py --arch minilm-l6 --n 32 --sequential 4 --json "$out/throughput.json" 2>&1 \
      | quiet | tee -a "$log"
    ;;
  coresets)
    $py bench/coreset_table.py --json "$out/coresets.json" 2>&1 | quiet | tee -a "$log"
    ;;
  dilm | vanilla)
    extra=()
    [[ $part == vanilla ]] && extra=(--set outer_loops=0)
    rm -rf "${work:?}/$part"
    $py -m dilm.cli distill --task sst2 --preset "${PRESET:-gpu}" "${extra[@]}" -o "$work/$part" --evaluate \
      --eval-seeds 5 --arch "${EVAL_ARCH:-minilm-l6}" 2>&1 | quiet | tee -a "$log"
    tar -czf "$out/$part-sets.tar.gz" -C "$work/$part" sets provenance.json scores.json
    ;;
  sweep)
    export DILM_SWEEP_DIR="$work/sweeps" MLFLOW_TRACKING_URI="sqlite:///$work/mlflow.db"
    $py -m tune.sweep --config sweeps/gpu-quick.yaml 2>&1 | quiet | tail -60 | tee -a "$log"
    $py -c "import mlflow; mlflow.search_runs(search_all_experiments=True).to_csv('$out/sweep-runs.csv')"
    ;;
  softlabel | softlabel-smollm2)
    archs=minilm-l6,tfidf-logreg,proxy
    [[ $part == softlabel-smollm2 ]] && archs=smollm2-135m,tfidf-logreg
    gen=()
    for g in dilm vanilla; do [[ -d $work/$g/sets ]] && gen+=(--generated "$g=$work/$g/sets"); done
    $py bench/softlabel_quality.py --dpc 10 --n-sets 20 --seeds 5 --archs "$archs" --mean-proxy "${gen[@]}" \
      --json "$out/$part.json" 2>&1 | quiet | tee -a "$log"
    ;;
  softlabel-fewer)
    $py bench/softlabel_quality.py --tasks ag_news --methods "" --totals 2,3 --dpc 1 --n-sets 20 --seeds 5 \
      --archs minilm-l6,proxy --tdd-sets 3 --json "$out/$part.json" 2>&1 | quiet | tee -a "$log"
    ;;
  *) echo "unknown part '$part'; known: check coresets dilm vanilla sweep softlabel softlabel-smollm2 softlabel-fewer" >&2
     exit 2 ;;
esac
echo "$part: $(( $(date +%s) - start )) s wall" | tee -a "$log"
