#!/usr/bin/env bash
# One device call: tests, compute-sanitizer, natsl benches and the peers, logs under $OUT.
# Run from the repository root on the GPU host after `../shared/gpu/pack --peers`:
#   bash bench/device_run.sh [tests|sanitize|bench|peers|profile|sparse|fused|fusedbench|fusedprof|split|splitbench|autotests|autobench|merge|layer]...   (default: the first four)
# `sparse` is the softmax-prefill loop of issue 8: its GPU tests, its benches and its
# peers (cuDNN, FA2, FlexAttention) in one call. `fused` and `fusedbench` are the GDN loop
# of issue 9 (one device call each, < 10 minutes; `split` and `splitbench`: the fused
# prefill's tests and bench rows alone, bench/NOTES.md session 9; `autotests` and `autobench`:
# Auto = the fused prefill wherever it has a kernel, session 10): the fused sm_90a prefill's GPU tests
# and compute-sanitizer on it; then the GDN benches of the P shapes and natsl-340M (every
# variant incl. `fused`, `fused cp off`, `fused cpK`) and ncu on the fused kernel. The
# FlashQLA / fla peers go in the `fusedbench` call too: bench/peers/qla/run_qla.sh (see
# bench/NOTES.md, "Fused GDN prefill"). `merge` is the merge epilogue of issue 10 (< 5 minutes):
# its GPU tests, compute-sanitizer memcheck on them and its bench. `layer` is the layer prefill of
# issue 10 (layer::prefill, < 5 minutes): its GPU tests, memcheck on the small case, its bench.
set -uo pipefail
OUT=${OUT:-/tmp/natsl-out}
mkdir -p "$OUT" bench/results
export NATSL_REQUIRE_GPU=1 NATSL_CACHE_DIR=/tmp/natsl-cache
eval "$(.gpu/run env)"
steps=${*:-tests sanitize bench peers}
NCU="ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats --section LaunchStats"
for step in $steps; do
  case $step in
    tests)
      # The three GPU suites in parallel (mostly NVRTC compiles and small launches).
      for t in gpu_gdn gpu_sparse gpu_router; do
        (timeout 400 .gpu/tests/$t --nocapture --test-threads=6 > "$OUT/tests-$t.log" 2>&1; echo "== $t rc $?" >> "$OUT/tests-$t.log") &
      done
      wait
      for t in .gpu/tests/reference .gpu/tests/validation*; do
        echo "== $t"; timeout 100 "$t" 2>&1
      done > "$OUT/tests-cpu.log" 2>&1
      # The main job (router -> GDN -> sparse on a natsl-340M input, checked) and the examples.
      for t in .gpu/bin/natsl .gpu/bin/0*; do
        echo "== $t rc $(timeout 120 "$t" > "$OUT/run.tmp" 2>&1; echo $?)"; tail -25 "$OUT/run.tmp"
      done > "$OUT/tests-run.log" 2>&1; rm -f "$OUT/run.tmp"
      grep -hE "^== |test result|panicked|near-tie" "$OUT"/tests-gpu*.log "$OUT"/tests-cpu.log; cat "$OUT/tests-run.log"
      cat "$OUT"/tests-*.log > "$OUT/tests.log"; rm -f "$OUT"/tests-*.log ;;  # at most 8 files come back
    sanitize)
      # Every kernel family, including the defaults (tiled router, compact prep, cp scan)
      # and the warp-specialized sparse prefill; the runs go in parallel.
      for spec in "gpu_router router_matches_reference_best_arch" "gpu_gdn decode_speculative_tokens_cross_a_chunk_boundary" \
                  "gpu_gdn prefill_f16_and_bf16_gva_labels_l2norm" "gpu_gdn prefill_cp_segments_single_sequence" \
                  "gpu_sparse prefill_routed_ragged_every_dims" "gpu_sparse decode_speculative_queries_and_splits"; do
        set -- $spec
        for tool in memcheck racecheck; do
          (timeout 420 compute-sanitizer --tool $tool ".gpu/tests/$1" "$2" > "$OUT/san-$tool-$2.log" 2>&1
           echo "-- $tool $1 $2: $(grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$OUT/san-$tool-$2.log" | tr '\n' ' ')") &
        done
      done > "$OUT/sanitizer.log" 2>&1
      wait
      cat "$OUT/sanitizer.log"; rm -f "$OUT"/san-*.log ;;
    bench)
      timeout 240 .gpu/tests/gdn > "$OUT/gdn_bench.log" 2>&1
      timeout 200 .gpu/tests/sparse > "$OUT/sparse_bench.log" 2>&1
      timeout 90 .gpu/bin/natsl bench router > "$OUT/router_bench.log" 2>&1
      cat bench/results/*"$(date +%F)".jsonl > "$OUT/natsl-results.jsonl" 2>/dev/null
      grep -hE " ms|TB/s" "$OUT/gdn_bench.log" "$OUT/sparse_bench.log" | cut -c1-150 ;;
    peers)
      timeout 150 .gpu/run py bench/peers/sparse_peers.py "$OUT/sparse-peers.jsonl" > "$OUT/sparse_peers.log" 2>&1
      timeout 300 .gpu/run py bench/peers/gdn_peers.py "$OUT/gdn-peers.jsonl" > "$OUT/gdn_peers.log" 2>&1
      grep -vi warn "$OUT/gdn_peers.log" | tail -20 ;;
    sparse)
      timeout 300 .gpu/tests/gpu_sparse prefill --nocapture --test-threads=4 > "$OUT/sparse-tests.log" 2>&1; echo "== gpu_sparse prefill rc $?"
      grep -E "test result|panicked" "$OUT/sparse-tests.log" | cut -c1-300 | tail -12; grep -c "WarpSpecialized: o: rel err" "$OUT/sparse-tests.log"
      timeout 240 .gpu/tests/sparse prefill > "$OUT/sparse-bench.log" 2>&1; echo "== bench rc $?"
      cp bench/results/sparse-"$(date +%F)".jsonl "$OUT/" 2>/dev/null
      timeout 200 .gpu/run py bench/peers/sparse_peers.py "$OUT/sparse-peers.jsonl" prefill > "$OUT/sparse-peers.log" 2>&1; echo "== peers rc $?"
      grep -h " ms" "$OUT/sparse-bench.log" "$OUT/sparse-peers.log" | cut -c1-150 ;;
    fused)
      timeout 500 .gpu/tests/gpu_gdn prefill_fused --nocapture --test-threads=2 > "$OUT/fused-tests.log" 2>&1; echo "== gpu_gdn prefill_fused rc $?"
      grep -E "^case |test result|panicked|FAIL" "$OUT/fused-tests.log" | cut -c1-200 | tail -40
      for tool in memcheck racecheck; do  # one log for both (at most 8 files come back)
        timeout 300 compute-sanitizer --tool $tool .gpu/tests/gpu_gdn prefill_fused_small > "$OUT/san.tmp" 2>&1
        echo "-- $tool: $(grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$OUT/san.tmp" | tr '\n' ' ')"
        cat "$OUT/san.tmp" >> "$OUT/fused-sanitizer.log"; rm -f "$OUT/san.tmp"
      done
      ;;
    fusedbench)
      timeout 330 .gpu/tests/gdn P1 P2 P3 P4 P5 P6 P7 P8 P9 natsl-340M > "$OUT/fused-bench.log" 2>&1; echo "== bench rc $?"
      cp bench/results/gdn-"$(date +%F)".jsonl "$OUT/" 2>/dev/null
      grep -hE "fused|bf16  |grouped " "$OUT/fused-bench.log" | cut -c1-150
      timeout 100 $NCU --section SourceCounters -k regex:_fused_split$ -c 1 .gpu/tests/gdn "P1 " > "$OUT/ncu_fused_p1.txt" 2>&1
      timeout 100 $NCU -k regex:_fused_split_cp_ -c 2 .gpu/tests/gdn "P5 " > "$OUT/ncu_fused_p5.txt" 2>&1
      grep -hE "^  [a-z_]+.*\(|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per|Stall" "$OUT"/ncu_fused_*.txt | head -60 ;;
    split)
      # The fused prefill (issue 9, ScanTile::Fused = fused_prep + fused_split*) against the
      # f64 reference, then compute-sanitizer on its small cut (< 10 minutes).
      timeout 420 .gpu/tests/gpu_gdn prefill_fused prefill_auto_fused --nocapture --test-threads=4 > "$OUT/split-tests.log" 2>&1; echo "== gpu_gdn prefill_fused rc $?"
      grep -E "^test |test result|panicked|FAIL" "$OUT/split-tests.log" | cut -c1-200 | tail -40
      for tool in memcheck racecheck; do
        timeout 150 compute-sanitizer --tool $tool .gpu/tests/gpu_gdn prefill_fused_small > "$OUT/san.tmp" 2>&1
        echo "-- $tool: $(grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$OUT/san.tmp" | tr '\n' ' ')"
        cat "$OUT/san.tmp" >> "$OUT/split-sanitizer.log"; rm -f "$OUT/san.tmp"
      done ;;
    splitbench)
      # The fused prefill's rows: `fused` (cp auto), `fused cp off`, `fused prep only`,
      # `fused scan only`, `fused cpK`, beside the default; its phase timer at P1 / P4;
      # ncu of fused_prep and fused_split at P1 (< 10 minutes).
      NATSL_BENCH_FUSED_ONLY=1 timeout 330 .gpu/tests/gdn P1 P2 P3 P4 P5 P6 P7 P8 P9 natsl-340M > "$OUT/split-bench.log" 2>&1; echo "== bench rc $?"
      cp bench/results/gdn-"$(date +%F)".jsonl "$OUT/" 2>/dev/null
      grep -hE " ms" "$OUT/split-bench.log" | cut -c1-150
      NATSL_BENCH_FUSED_PROFILE=1 timeout 120 .gpu/tests/gdn "P1 " "P4 " > "$OUT/split-profile.log" 2>&1; echo "== profile rc $?"
      timeout 100 $NCU -k regex:'_fused_(prep|split)$' -c 2 .gpu/tests/gdn "P1 " > "$OUT/ncu_split_p1.txt" 2>&1
      grep -hE "^  [a-z_]+.*\(|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per" "$OUT"/ncu_split_p1.txt | head -40 ;;
    autotests)
      # Session 10: Auto runs the fused prefill wherever it has a kernel (most dk-128 cases of
      # the suite) with its own cp rule. Every GDN prefill GPU test, then memcheck and
      # racecheck on prefill_auto_fused (few CTAs, cp Auto = 8 segments) (< 10 minutes).
      timeout 330 .gpu/tests/gpu_gdn prefill --nocapture --test-threads=6 > "$OUT/auto-tests.log" 2>&1; echo "== gpu_gdn prefill rc $?"
      grep -E "^test |test result|panicked|FAIL" "$OUT/auto-tests.log" | cut -c1-200 | tail -50
      for tool in memcheck racecheck; do
        timeout 120 compute-sanitizer --tool $tool .gpu/tests/gpu_gdn prefill_auto_fused > "$OUT/san.tmp" 2>&1
        echo "-- $tool: $(grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|test result" "$OUT/san.tmp" | tr '\n' ' ')"
        cat "$OUT/san.tmp" >> "$OUT/auto-sanitizer.log"; rm -f "$OUT/san.tmp"
      done ;;
    autobench)
      # Session 10: the new Auto end to end (row `bf16`) at P6 / P7 (not run in run o; the
      # previous Auto there is `grouped+reg`) and at P4 / P9 (cp Auto = 4 now), with `fused cpK`,
      # then P1 / P2 / P3 / P5 / P8 / natsl-340M, fused rows only (< 10 minutes).
      timeout 300 .gpu/tests/gdn "P4 " "P6 " "P7 " "P9 " > "$OUT/auto-bench.log" 2>&1; echo "== bench rc $?"
      NATSL_BENCH_FUSED_ONLY=1 timeout 150 .gpu/tests/gdn "P1 " "P2 " "P3 " "P5 " "P8 " natsl-340M >> "$OUT/auto-bench.log" 2>&1; echo "== fused-only bench rc $?"
      cp bench/results/gdn-"$(date +%F)".jsonl "$OUT/" 2>/dev/null
      grep -hE " ms" "$OUT/auto-bench.log" | cut -c1-150 ;;
    fusedprof)
      # The fused kernel's phase timer at P1 and P4 (< 2 minutes): cycles per copy-thread and
      # consumer phase, the loop periods and the copy -> consumer hand-over.
      NATSL_BENCH_FUSED_PROFILE=1 timeout 150 .gpu/tests/gdn "P1 " "P4 " > "$OUT/fused-profile.log" 2>&1; echo "== profile rc $?"
      grep -vE "^\s*$|^running|^test result" "$OUT/fused-profile.log" | cut -c1-120 | head -80 ;;
    merge)
      timeout 200 .gpu/tests/gpu_merge --nocapture --test-threads=2 > "$OUT/merge-tests.log" 2>&1; echo "== gpu_merge rc $?"
      grep -E "test result|panicked|skipped" "$OUT/merge-tests.log" | cut -c1-300 | tail -12; grep -c "rel err" "$OUT/merge-tests.log"
      timeout 200 compute-sanitizer --tool memcheck .gpu/tests/gpu_merge merge_every_dvs merge_strided > "$OUT/merge-memcheck.log" 2>&1; echo "== memcheck rc $?"
      grep -hE "ERROR SUMMARY|test result" "$OUT/merge-memcheck.log"
      timeout 150 .gpu/tests/merge > "$OUT/merge-bench.log" 2>&1; echo "== bench rc $?"
      cp bench/results/merge-"$(date +%F)".jsonl "$OUT/" 2>/dev/null
      grep -hE "^merge" "$OUT/merge-bench.log" | cut -c1-150 ;;
    layer)
      # gpu_layer (both code paths, the f64 reference after the device router), memcheck on
      # the small case (both stream modes), then the bench (natsl-340M, rho 0.3, T 4k-128k).
      timeout 240 .gpu/tests/gpu_layer --nocapture --test-threads=4 > "$OUT/layer-tests.log" 2>&1; echo "== gpu_layer rc $?"
      grep -E "^test |test result|panicked|near-tie|rel err" "$OUT/layer-tests.log" | cut -c1-220 | tail -60
      timeout 150 compute-sanitizer --tool memcheck .gpu/tests/gpu_layer prefill_small_for_the_sanitizer > "$OUT/layer-memcheck.log" 2>&1; echo "== memcheck rc $?"
      grep -hE "ERROR SUMMARY|test result" "$OUT/layer-memcheck.log"
      timeout 200 .gpu/tests/layer > "$OUT/layer-bench.log" 2>&1; echo "== bench rc $?"
      cp bench/results/layer-"$(date +%F)".jsonl "$OUT/" 2>/dev/null
      grep -hE "^340M|parts alone" "$OUT/layer-bench.log" | cut -c1-200 ;;
    verify)
      # The kernels changed since their last device run: sparse prefill (every kernel,
      # block lists too) and the fused GDN prefill, with memcheck on both.
      timeout 200 .gpu/tests/gpu_sparse prefill --test-threads=4 > "$OUT/verify.log" 2>&1; echo "== gpu_sparse prefill rc $?"
      timeout 200 .gpu/tests/gpu_gdn prefill_fused prefill_auto_fused --test-threads=2 >> "$OUT/verify.log" 2>&1; echo "== gpu_gdn prefill_fused rc $?"
      NATSL_TEST_KERNELS=WarpSpecialized timeout 150 compute-sanitizer --tool memcheck .gpu/tests/gpu_sparse prefill_routed_ragged_every_dims >> "$OUT/verify.log" 2>&1; echo "== memcheck sparse ws rc $?"
      timeout 150 compute-sanitizer --tool memcheck .gpu/tests/gpu_gdn prefill_fused_small >> "$OUT/verify.log" 2>&1; echo "== memcheck fused rc $?"
      grep -E "test result|panicked|ERROR SUMMARY" "$OUT/verify.log" | cut -c1-200 ;;
    wsab)
      # A/B of sparse WS experiment builds (NATSL_NVRTC_DEFINES), interleaved: WSAB_VARIANTS
      # is a list of name:DEFINES with DEFINES comma-separated.
      for rep in ${WSAB_REPS:-1 2}; do
        for v in ${WSAB_VARIANTS:-base:}; do
          n=${v%%:*}; d=${v#*:}
          NATSL_NVRTC_DEFINES="${d//,/ }" NATSL_BENCH_KERNELS=WarpSpecialized timeout 100 .gpu/tests/sparse prefill > "$OUT/ab.tmp" 2>&1
          grep -E "^prefill" "$OUT/ab.tmp" | head -8 | sed "s/^/$n $rep /" | cut -c1-120 | tee -a "$OUT/wsab.log"
        done
      done; rm -f "$OUT/ab.tmp" ;;
    wsncu)
      # One dense-causal launch of the sparse WS kernel: pipes, stalls, per-SASS-instruction samples.
      NATSL_BENCH_KERNELS=WarpSpecialized timeout 200 ncu --clock-control none --set full --import-source no \
        --metrics sm__cycles_elapsed.avg.per_second,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active \
        -k regex:prefill_ws -c 1 -o "$OUT/ws" .gpu/tests/sparse "dense causal" > "$OUT/wsncu.log" 2>&1; echo "== ncu rc $?"
      ncu -i "$OUT/ws.ncu-rep" --page details > "$OUT/ws-details.txt" 2>&1
      ncu -i "$OUT/ws.ncu-rep" --page source --csv --print-source sass > "$OUT/ws-source.csv" 2>&1; echo "== source rc $? $(wc -l < "$OUT/ws-source.csv")"
      grep -E "Duration|SM Frequency|Compute \(SM\) Throughput|gmma|Issue Slots|Executed Ipc|No Eligible|Warp Cycles Per Issued" "$OUT/ws-details.txt" | head -30 ;;
    profile)
      # One launch of each kernel the notes name as the next bottleneck.
      timeout 120 $NCU -k regex:natsl_router -c 2 .gpu/bin/natsl bench router "T=131072" > "$OUT/ncu_router.txt" 2>&1
      timeout 150 $NCU -k regex:natsl_gdn_prefill -c 2 .gpu/tests/gdn "P1 " > "$OUT/ncu_gdn.txt" 2>&1
      timeout 150 $NCU -k regex:natsl_sparse_prefill -c 2 .gpu/tests/sparse "dense causal" > "$OUT/ncu_sparse.txt" 2>&1
      grep -hE "^  [a-z_]+.*\(|Duration|Memory Throughput|Compute \(SM\) Throughput|Achieved Occupancy|Registers Per" "$OUT"/ncu_*.txt | head -60 ;;
  esac
done
