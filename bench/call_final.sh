#!/usr/bin/env bash
# The closing device call of a session (fits the 10-minute call limit). Run after
# ../shared/gpu/pack (add --peers for fla), with carry [".gpu"]. Two halves, default both:
#   tests  every GPU test suite, the main job and the examples, compute-sanitizer
#          (memcheck + racecheck) on each kernel family in parallel with the suites;
#   bench  the sparse softmax benches with their peers (cuDNN, FA2, FlexAttention via
#          torch) in the same call, and the router bench.
# The GDN benches with fla are `bash bench/device_run.sh bench peers`.
set -uo pipefail
OUT=${OUT:-/tmp/natsl-out}; mkdir -p "$OUT" bench/results
eval "$(.gpu/run env)"; export NATSL_REQUIRE_GPU=1 NATSL_CACHE_DIR=/tmp/natsl-cache
steps=${*:-tests bench}
if [[ " $steps " == *" tests "* ]]; then
for t in gpu_gdn gpu_sparse gpu_router gpu_engine gpu_module_cache; do
  (timeout 280 .gpu/tests/$t --nocapture --test-threads=6 > "$OUT/t-$t.log" 2>&1; echo "== $t rc $?" >> "$OUT/t-$t.log") &
done
# The sparse sanitizer runs cover the warp-specialized (TMA) kernel only.
for spec in "gpu_sparse prefill_natsl_views_gqa_rmsnorm" "gpu_sparse prefill_long_sequences_wrap_the_kv_ring" \
            "gpu_gdn prefill_f16_and_bf16_gva_labels_l2norm" "gpu_gdn decode_single_token_with_commit_across_positions" \
            "gpu_router router_matches_reference_best_arch"; do
  set -- $spec
  for tool in memcheck racecheck; do
    (NATSL_TEST_KERNELS=WarpSpecialized timeout 280 compute-sanitizer --tool $tool --print-limit 20 ".gpu/tests/$1" "$2" > "$OUT/s-$tool-$2.log" 2>&1; echo "== $tool $2 rc $?" >> "$OUT/s-$tool-$2.log") &
  done
done
wait
for t in .gpu/tests/reference .gpu/tests/validation*; do echo "== $t"; timeout 60 "$t" 2>&1 | grep "test result"; done > "$OUT/t-cpu.log" 2>&1
for t in .gpu/bin/natsl .gpu/bin/0*; do
  echo "== $t rc $(timeout 90 "$t" > "$OUT/run.tmp" 2>&1; echo $?)"; tail -25 "$OUT/run.tmp"
done > "$OUT/t-run.log" 2>&1; rm -f "$OUT/run.tmp"
grep -hE "^== |test result|panicked|near-tie" "$OUT"/t-*.log | cut -c1-200
for f in "$OUT"/s-*.log; do echo "$(basename $f): $(grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|test result" $f | tr '\n' ' ')"; done
cat "$OUT"/t-*.log > "$OUT/tests.log"; cat "$OUT"/s-*.log > "$OUT/sanitizer.log"; rm -f "$OUT"/t-*.log "$OUT"/s-*.log
fi
[[ " $steps " == *" bench "* ]] || exit 0
timeout 120 .gpu/tests/sparse > "$OUT/sparse_bench.log" 2>&1
timeout 150 .gpu/run py bench/peers/sparse_peers.py "$OUT/sparse-peers.jsonl" prefill > "$OUT/sparse_peers.log" 2>&1
timeout 60 .gpu/bin/natsl bench router "T=16384" "T=131072" > "$OUT/router_bench.log" 2>&1
cat bench/results/*"$(date +%F)".jsonl > "$OUT/natsl-results.jsonl" 2>/dev/null
grep -hE " ms| us|TB/s" "$OUT/sparse_bench.log" "$OUT/sparse_peers.log" "$OUT/router_bench.log" | cut -c1-130
