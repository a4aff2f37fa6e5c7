#!/usr/bin/env bash
# The closing device call of a session (fits the 10-minute call limit): every GPU test
# suite, the main job and the examples, compute-sanitizer on the kernels changed since
# the last clean run (in parallel with the tests), then the GDN benches and fla-core in
# the same call. Sparse and router benches with their peers run in their own call
# (see bench/device_run.sh). Run after ../shared/gpu/pack --peers, with carry [".gpu"].
set -uo pipefail
OUT=${OUT:-/tmp/natsl-out}; mkdir -p "$OUT" bench/results
eval "$(.gpu/run env)"; export NATSL_REQUIRE_GPU=1 NATSL_CACHE_DIR=/tmp/natsl-cache
# Two halves, each within one call: `tests` and `bench` (default: both).
steps=${*:-tests bench}
if [[ " $steps " == *" tests "* ]]; then
for t in gpu_gdn gpu_sparse gpu_router; do
  (timeout 300 .gpu/tests/$t --nocapture --test-threads=6 > "$OUT/t-$t.log" 2>&1; echo "== $t rc $?" >> "$OUT/t-$t.log") &
done
for spec in "gpu_sparse prefill_natsl_views_gqa_rmsnorm" "gpu_gdn prefill_f16_and_bf16_gva_labels_l2norm" \
            "gpu_gdn prefill_cp_segments_single_sequence" "gpu_gdn decode_single_token_with_commit_across_positions"; do
  set -- $spec
  for tool in memcheck racecheck; do
    (timeout 300 compute-sanitizer --tool $tool --print-limit 20 ".gpu/tests/$1" "$2" > "$OUT/s-$tool-$2.log" 2>&1; echo "== $tool $2 rc $?" >> "$OUT/s-$tool-$2.log") &
  done
done
wait
for t in .gpu/tests/reference .gpu/tests/validation*; do echo "== $t"; timeout 60 "$t" 2>&1 | grep "test result"; done > "$OUT/t-cpu.log" 2>&1
for t in .gpu/bin/natsl .gpu/bin/0*; do
  echo "== $t rc $(timeout 120 "$t" > "$OUT/run.tmp" 2>&1; echo $?)"; tail -25 "$OUT/run.tmp"
done > "$OUT/t-run.log" 2>&1; rm -f "$OUT/run.tmp"
grep -hE "^== |test result|panicked|near-tie" "$OUT"/t-*.log
for f in "$OUT"/s-*.log; do echo "$(basename $f): $(grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|test result" $f | tr '\n' ' ')"; done
cat "$OUT"/t-*.log > "$OUT/tests.log"; cat "$OUT"/s-*.log > "$OUT/sanitizer.log"; rm -f "$OUT"/t-*.log "$OUT"/s-*.log
fi
[[ " $steps " == *" bench "* ]] || exit 0
timeout 200 .gpu/tests/gdn "P1 " "P2 " "P3 " "P4 " "P5 " "P6 " "P7 " "P8 " "P9 " natsl > "$OUT/gdn_bench.log" 2>&1
grep -hE " ms" "$OUT/gdn_bench.log" | cut -c1-100
cat bench/results/*"$(date +%F)".jsonl > "$OUT/natsl-results.jsonl" 2>/dev/null
timeout 270 .gpu/run py bench/peers/gdn_peers.py "$OUT/gdn-peers.jsonl" "P1 " "P2 " "P3 " "P4 " "P5 " "P6 " "P7 " "P8 " "P9 " natsl decode > "$OUT/gdn_peers.log" 2>&1
grep -vi warn "$OUT/gdn_peers.log" | tail -20
