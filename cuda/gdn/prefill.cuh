// gdn/prefill.cuh: Gated DeltaNet chunk scan with NAtS chunk commit (SPEC.md section 4).
//
// Per chunk (C = 64 tokens) and value head, with G the inclusive cumulative gate:
//   A = strictly_lower(beta_i e^{G_i-G_j} k_i.k_j),  T = (I + A)^{-1}
//   W = T diag(beta e^G) K,  U = T diag(beta) V,  P = scale (Q K^T o e^{G_i-G_j}) (j <= i)
// and, from the chunk's starting state S (see reference/gdn.rs chunk_wy):
//   v_new = U - W S
//   o     = (scale e^G o Q) S + P v_new
//   S'    = e^{G_L} S + (e^{G_L-G} o K)^T v_new
// Commit: GDN chunk: S <- S'; ATTN chunk: S <- e^{G_L} S (outputs use S' either way).
//
// prep: fully parallel over (chunk slot, value head): W, U, P and the per-row
//       factors F = (fq, fk, G) to the workspace, with
//         fq_i = scale e^{G_i} / |q_i|,  fk_j = e^{G_L - G_j} / |k_j|  (norms: l2norm only)
//       T blockwise on the tensor cores (16x16 diagonal solves, split-bf16 merges);
//       prep_grouped: one CTA per (slot, q/k head) serving its value heads.
// scan: one CTA per (sequence, value head, dv tile); the dk x BV state slice stays
//       in f32 registers, a bf16/f16 copy in smem feeds the tensor cores (scan_reg:
//       the transposed state itself is the mma A operand, no smem copy). The scan
//       reads raw q, k and applies the row factors to its f32 accumulators / v_new,
//       so it does no per-row normalisation work of its own:
//         o = diag(fq) (Q S) + P v_new,   S' = e^{G_L} S + K^T (diag(fk) v_new).
// fused (gdn/fused.cuh, sm_90a, dk 128; ScanTile::Fused): prep_grouped<FUSED_WS> (entry
//       fused_prep) writes only Tb = T diag(beta), P and F per chunk; the scan,
//       warp-specialised with the state in wgmma accumulators, copies them in.
#pragma once
#include "gdn/prep.cuh"
#include "gdn/scan.cuh"
