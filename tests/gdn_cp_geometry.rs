//! CPU model of the context-parallel scan's segment geometry (ScanParallel::Segments):
//! the CTA -> (sequence, segment, tile) maps of scan_cp_a / cp_combine / scan_cp_c in
//! cuda/gdn/scan.cuh and the grids of the cp launches in src/ops/gdn.rs, mirrored here.
//! For every sequence of ragged batches it checks that the chunks each CTA covers tile
//! the sequence exactly once per column tile, that every E / A row a pass reads was
//! written by an earlier pass, and that the final states are written exactly once.

const C: usize = 64;

/// `cp_geometry` in scan.cuh.
fn cp_geometry(nch: usize, segments: usize) -> (usize, usize) {
    let sl = nch.div_ceil(segments).max(1);
    (sl, nch.div_ceil(sl).max(1))
}

#[derive(Default, Clone)]
struct SeqLog {
    /// o coverage count per (column tile, chunk).
    o: Vec<Vec<u32>>,
    /// Final (committed / running) writes per column tile.
    fin: Vec<u32>,
    /// E[s] writes per (segment, column tile) by pass A; A[s] per (segment, dk tile).
    e_a: Vec<Vec<u32>>,
    a_a: Vec<Vec<u32>>,
}

fn check(lens: &[usize], segments: usize, dk: usize, dv: usize, bv: usize) {
    let (tk, tv) = (dk / bv, dv / bv);
    let nchs: Vec<usize> = lens.iter().map(|l| l.div_ceil(C)).collect();
    let mut logs: Vec<SeqLog> = nchs
        .iter()
        .map(|&nch| SeqLog {
            o: vec![vec![0; nch]; tv],
            fin: vec![0; tv],
            e_a: vec![vec![0; tv]; segments],
            a_a: vec![vec![0; tk]; segments],
        })
        .collect();
    // The segment a CTA runs: (first chunk, chunk count); mirrors scan_cp's prologue.
    let seg_range = |nch: usize, seg: usize| {
        let (sl, _) = cp_geometry(nch, segments);
        let b = seg * sl;
        let e = nch.min(b + sl);
        (b, e)
    };
    // Pass A: grid x = segments * (dk + dv) / bv.
    for (n, &nch) in nchs.iter().enumerate() {
        let (sl, segs) = cp_geometry(nch, segments);
        assert!(segs <= segments, "segs {segs} > segments {segments} (nch {nch})");
        assert!(sl * (segs - 1) < nch && sl * segs >= nch);
        for bx in 0..segments * (dk + dv) / bv {
            let seg = bx / (tk + tv);
            let t = bx % (tk + tv);
            let ident = t < tk;
            if seg >= segs || (seg > 0 && seg == segs - 1) || (seg == 0 && ident) {
                continue;
            }
            let vt = if ident { t } else { t - tk };
            let want_o = seg == 0;
            let (b, e) = seg_range(nch, seg);
            assert!(b < e, "pass A: empty segment {seg} of nch {nch}");
            let final_seg = bx / (tk + tv) == segs - 1;
            assert_eq!(final_seg, e == nch);
            if want_o {
                for c in b..e {
                    logs[n].o[vt][c] += 1;
                }
            }
            if final_seg {
                assert!(!ident);
                logs[n].fin[vt] += 1;
            } else {
                // A segment end that is not the sequence end is a complete chunk.
                assert!(e * C <= lens[n], "pass A: segment {seg} ends inside a partial chunk");
                if ident {
                    logs[n].a_a[seg][vt] += 1;
                } else {
                    logs[n].e_a[seg][vt] += 1;
                }
            }
        }
    }
    // Pass B (cp_combine, only launched for segments >= 3): reads E[0..segs-2],
    // A[1..segs-2]; afterwards E[s] (s <= segs - 2) is the true end state of segment s.
    for (n, &nch) in nchs.iter().enumerate() {
        let (_, segs) = cp_geometry(nch, segments);
        if segs >= 3 {
            assert!(segments >= 3, "combine skipped by the host but needed");
            for s in 0..=segs - 2 {
                assert!(logs[n].e_a[s].iter().all(|&x| x == 1), "E[{s}] not written once (n {n})");
                if s >= 1 {
                    assert!(logs[n].a_a[s].iter().all(|&x| x == 1), "A[{s}] not written once (n {n})");
                }
            }
        }
        if segs == 2 {
            assert!(logs[n].e_a[0].iter().all(|&x| x == 1));
        }
    }
    // Pass C: grid x = (segments - 1) * dv / bv; segment s >= 1 from E[s - 1].
    for (n, &nch) in nchs.iter().enumerate() {
        let (_, segs) = cp_geometry(nch, segments);
        for bx in 0..(segments - 1) * dv / bv {
            let seg = 1 + bx / tv;
            let vt = bx % tv;
            if seg >= segs {
                continue;
            }
            assert_eq!(logs[n].e_a[seg - 1][vt], 1, "pass C reads an unwritten E[{}]", seg - 1);
            let (b, e) = seg_range(nch, seg);
            assert!(b < e);
            for c in b..e {
                logs[n].o[vt][c] += 1;
            }
            let final_seg = 1 + bx / tv == segs - 1;
            assert_eq!(final_seg, e == nch);
            if final_seg {
                logs[n].fin[vt] += 1;
            }
        }
    }
    for (n, l) in logs.iter().enumerate() {
        for (vt, o) in l.o.iter().enumerate() {
            assert!(o.iter().all(|&x| x == 1), "lens {lens:?} S {segments}: seq {n} tile {vt} o coverage {o:?}");
        }
        assert!(l.fin.iter().all(|&x| x == 1), "seq {n}: final writes {:?}", l.fin);
    }
}

#[test]
fn cp_segments_tile_every_sequence_once() {
    let ragged: &[&[usize]] = &[
        &[1, 63, 64, 65, 200, 1000, 640],
        &[1, 63, 64, 65, 200, 1000],
        &[1000],
        &[16384],
        &[64, 128, 129, 4096, 1, 1, 7000],
    ];
    for lens in ragged {
        for segments in [2, 3, 4, 5, 7, 8, 16, 32, 64] {
            let max_chunks = lens.iter().map(|l| l.div_ceil(C)).max().unwrap();
            // The host clamps segments to the longest sequence's chunk count.
            let segments = segments.min(max_chunks).max(2);
            if segments > max_chunks {
                continue;
            }
            for (dk, dv, bv) in [(64, 64, 64), (64, 64, 32), (128, 128, 64), (128, 128, 32), (256, 256, 64), (128, 256, 64), (192, 384, 64)] {
                check(lens, segments, dk, dv, bv);
            }
        }
    }
}

#[test]
fn cp_every_length_up_to_40_chunks() {
    for nch in 1..=40usize {
        for partial in [0usize, 1, 63] {
            let len = if partial == 0 { nch * C } else { (nch - 1) * C + partial };
            for segments in 2..=12 {
                check(&[len, 40 * C], segments, 128, 128, 64);
            }
        }
    }
}

/// `ScanParallel::Auto` on the shapes measured on H200 (132 SMs) on 2026-11-28
/// (see `cp_auto_segments`): P5 and natsl-340M split near their best measured
/// segment counts (16 and 8), P1 / P4 / P9 stay on the plain scan.
#[test]
fn cp_auto_matches_h200_measurements() {
    use natsl::ops::gdn::{cp_auto_segments, cp_geometry, scan_smem_bytes};
    let auto = |nchs: &[usize], hv: usize, dk: usize, dv: usize, bv: usize| {
        cp_auto_segments(nchs, hv, dk, dv, bv, scan_smem_bytes(dk, bv, 1), 132)
    };
    let p5 = auto(&[512], 8, 128, 128, 64);
    let m340 = auto(&[512], 6, 128, 256, 64);
    let p4 = auto(&[512], 32, 128, 128, 64);
    let p9 = auto(&[1024], 32, 128, 128, 64);
    let p1 = auto(&[128; 8], 16, 128, 128, 64);
    let long = auto(&[256], 2, 128, 128, 64);
    let ragged = auto(&[1, 1, 1, 2, 4, 16, 10], 2, 64, 64, 32);
    println!("P5 {p5} 340M {m340} P4 {p4} P9 {p9} P1 {p1} cp-long {long} ragged {ragged}");
    assert!((12..=20).contains(&p5), "P5 {p5}");
    assert!((7..=10).contains(&m340), "340M {m340}");
    assert_eq!((p4, p9, p1), (1, 1, 1));
    assert!(long > 1);
    // Mirrors scan.cuh.
    for nch in 1..200 {
        for s in 1..70 {
            let (sl, segs) = cp_geometry(nch, s);
            assert!(sl * (segs - 1) < nch && sl * segs >= nch && segs <= s.max(1));
        }
    }
}

/// `ScanParallel::Auto` for the fused prefill (`cp_auto_segments_fused`: 128-column tiles,
/// the `fused_split*` kernels' smem, >= 1.25x in the model, powers of two) on the shapes of
/// H200 run o (132 SMs): P1, P2, P8 off, P4 and P9 4, P5 16, natsl-340M 8 (measured best:
/// P4 cp4 1.231 / cp8 1.226 ms, P9 cp4 2.387, P5 cp16 0.456, natsl-340M cp8 0.477). The
/// older scans' rule (2x) leaves P4 / P9 off at the same tile.
#[test]
fn cp_auto_fused_matches_h200_run_o() {
    use natsl::ops::gdn::{cp_auto_segments, cp_auto_segments_fused, fused_split_smem_bytes, FUSED_TILE};
    let bv = FUSED_TILE.block_n as usize;
    let smem = fused_split_smem_bytes();
    let fused = |nchs: &[usize], hv: usize, dv: usize| cp_auto_segments_fused(nchs, hv, 128, dv, bv, smem, 132);
    let shapes: [(&str, &[usize], usize, usize, usize); 7] = [
        ("P1", &[128; 8], 16, 128, 1),
        ("P2", &[128; 8], 32, 128, 1),
        ("P4", &[512], 32, 128, 4),
        ("P5", &[512], 8, 128, 16),
        ("P8", &[32], 32, 128, 1),
        ("P9", &[1024], 32, 128, 4),
        ("natsl-340M", &[512], 6, 256, 8),
    ];
    for (name, nchs, hv, dv, want) in shapes {
        let got = fused(nchs, hv, dv);
        println!("{name}: fused cp Auto {got}");
        assert_eq!(got, want, "{name}");
    }
    assert_eq!(cp_auto_segments(&[512], 32, 128, 128, bv, smem, 132), 1);
    assert_eq!(cp_auto_segments(&[1024], 32, 128, 128, bv, smem, 132), 1);
    // Degenerate inputs neither panic nor split.
    assert_eq!(fused(&[], 1, 128), 1);
    assert_eq!(fused(&[0, 0], 4, 128), 1);
    assert_eq!(fused(&[1], 1, 128), 1);
    assert!(cp_auto_segments_fused(&[usize::MAX / 2], usize::MAX / 2, 128, 128, bv, smem, 132) >= 1);
}
