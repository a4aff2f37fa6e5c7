/* Gated DeltaNet chunk scan with NAtS chunk commit (SPEC.md sections 4 and 7). */
#ifndef NATSL_PARAMS_GDN_H
#define NATSL_PARAMS_GDN_H

/*
 * Prefill: two launches over a packed batch.
 *   prep: grid (num_slots, num_v_heads). Chunk-local WY transform of one 64-token
 *         chunk and value head into the workspace (W, U, P and the row factors F).
 *   scan: grid (dv / BLOCK_N, num_v_heads, num_seqs). Walks the chunks of one
 *         sequence in order with a dk x BLOCK_N slice of the f32 state in registers.
 * Workspace rows are addressed by chunk slot (see NatslVarlen): row (slot * Hv + h).
 */
/* Bytes per (chunk slot, value head) record of ws_fused: 2 x 8192 + 1024. */
#define NATSL_GDN_FREC_BYTES 17408

typedef struct NatslGdnPrefillParams {
    NatslVarlen batch;
    const void* q;              /* [T, Hqk, dk] activation dtype, last dim contiguous */
    long long q_stride_t;       /* elements between tokens of q (multiple of 8) */
    long long q_stride_h;       /* elements between heads of q (multiple of 8) */
    const void* k;              /* [T, Hqk, dk] activation dtype */
    long long k_stride_t;       /* elements between tokens of k (multiple of 8) */
    long long k_stride_h;       /* elements between heads of k (multiple of 8) */
    const void* v;              /* [T, Hv, dv] activation dtype */
    long long v_stride_t;       /* elements between tokens of v (multiple of 8) */
    long long v_stride_h;       /* elements between heads of v (multiple of 8) */
    const float* g;             /* [T, Hv] f32 log-decay, head stride 1 */
    long long g_stride_t;       /* elements between tokens of g */
    const void* beta;           /* [T, Hv] f32 or activation dtype, head stride 1 */
    long long beta_stride_t;    /* elements between tokens of beta */
    int beta_f32;               /* 1: beta is f32; 0: beta is the activation dtype */
    int l2norm;                 /* 1: L2-normalise q and k rows in the kernel (eps 1e-6) */
    void* o;                    /* out [T, Hv, dv] activation dtype */
    long long o_stride_t;       /* elements between tokens of o (multiple of 8) */
    long long o_stride_h;       /* elements between heads of o (multiple of 8) */
    int num_qk_heads;           /* Hqk */
    int num_v_heads;            /* Hv, a multiple of Hqk */
    int num_r_heads;            /* Hr, routing heads (Hv a multiple of Hr); unused without labels */
    float scale;                /* output scale (dk^-1/2 by default) */
    const unsigned char* labels; /* nullable [num_slots, Hr] u8 NATSL_LABEL_*; null = every chunk GDN */
    const float* h0_pool;       /* nullable [P0, Hv, dk, dv] f32 initial states; null = zeros */
    const int* h0_index;        /* nullable [N] device: row of h0_pool for sequence n; null = n; -1 or a row outside [0, h0_pool_rows) (a fault): start from zeros */
    int h0_pool_rows;           /* P0 */
    float* committed_pool;      /* nullable [P1, Hv, dk, dv] f32 out: committed state S_c */
    const int* committed_index; /* nullable [N] device: row of committed_pool; null = n; -1 or a row outside [0, committed_pool_rows) (a fault): not written */
    int committed_pool_rows;    /* P1 */
    float* running_pool;        /* nullable [P2, Hv, dk, dv] f32 out: running state (= committed if the last chunk is complete) */
    const int* running_index;   /* nullable [N] device: row of running_pool; null = n; -1 or a row outside [0, running_pool_rows) (a fault): not written */
    int running_pool_rows;      /* P2 */
    float* gsum_running;        /* nullable [N, Hv] f32 out: sum of g over the partial last chunk (0 if complete) */
    void* ws_w;                 /* workspace [num_slots, Hv, 64, dk] activation dtype: W = T diag(beta e^G) K */
    void* ws_u;                 /* workspace [num_slots, Hv, 64, dv] activation dtype: U = T diag(beta) V */
    void* ws_p;                 /* workspace [num_slots, Hv, 64, 64] activation dtype: scale (Q K^T o decay), lower incl. diagonal */
    float* ws_g;                /* workspace [num_slots, Hv, 3, 64] f32 row factors: scale e^G / |q|, e^(G_last - G) / |k|, G (cumulative g inside the chunk; pads repeat the last) */
    void* ws_fused;             /* fused prefill only (entries fused_prep -> fused_split*): [num_slots, Hv] records of NATSL_GDN_FREC_BYTES: T diag(beta) and P ([64][64] activation dtype each, 128B-swizzled rows), then f32 fq[64], fk[64], (G_last, label), fe[64] = e^G / |k| */
    /* Context parallelism (entries scan_cp_a, cp_combine, scan_cp_c only; the plain scan ignores these). */
    int cp_segments;            /* S: each sequence of nch chunks splits into ceil(nch / ceil(nch / S)) segments of ceil(nch / S) chunks */
    float* ws_cp_e;             /* workspace [N, S, Hv, dk, dv] f32: segment offsets E, then true segment end states */
    float* ws_cp_a;             /* workspace [N, S, Hv, dk, dk] f32: segment transitions A */
    unsigned int* faults;       /* the runtime's device fault word (NATSL_FAULT_*) */
} NatslGdnPrefillParams;

/*
 * The fused sm_90a prefill (entries fused_split, fused_split_cp_a, fused_split_cp_c;
 * ScanTile::Fused in src/ops/gdn.rs): grid (dv / 128, num_v_heads, num_seqs) (context
 * parallelism: the scan_cp grid with 128-column tiles). q, k, v are read by TMA through
 * the maps below (3-D (dim, head, token) tensors, 64 x 1 x 64 boxes, 128-byte swizzle);
 * base.ws_w, ws_u, ws_p, ws_g are unused. The entries bulk-copy the records that the
 * parallel fused_prep kernel (grid (num_slots, Hqk), 128 threads, NatslGdnPrefillParams)
 * wrote to base.ws_fused, one per chunk, into their stage ring.
 * Taken as a __grid_constant__ (the maps must stay in parameter space).
 */
typedef struct NatslGdnFusedParams {
    NatslTensorMap tma_q;       /* q [T, Hqk, dk] */
    NatslTensorMap tma_k;       /* k [T, Hqk, dk] */
    NatslTensorMap tma_v;       /* v [T, Hv, dv] */
    NatslGdnPrefillParams base; /* everything else, as for prep + scan */
} NatslGdnFusedParams;

/*
 * Decode: grid (dv / BLOCK_N, num_v_heads, num_seqs). tokens_per_seq tokens of
 * each sequence (1 + speculative, at most 8) are run in order on the running
 * state, which the kernel updates in place. When a token completes a chunk
 * (pos becomes a multiple of 64), the chunk is committed with its label:
 * GDN: committed <- running; ATTN: committed <- exp(gsum) * committed; then
 * running <- committed, gsum <- 0. pos and gsum are advanced by the last CTA of
 * each sequence (arrival counter), so no host sync is needed (graph-capturable).
 */
typedef struct NatslGdnDecodeParams {
    int num_seqs;               /* N */
    int tokens_per_seq;         /* tokens per sequence in this step, 1..8; token j of sequence n is row n * tokens_per_seq + j */
    const void* q;              /* [N * tokens_per_seq, Hqk, dk] activation dtype */
    long long q_stride_t;       /* elements between rows of q (multiple of 8) */
    long long q_stride_h;       /* elements between heads of q (multiple of 8) */
    const void* k;              /* [N * tokens_per_seq, Hqk, dk] activation dtype */
    long long k_stride_t;       /* elements between rows of k (multiple of 8) */
    long long k_stride_h;       /* elements between heads of k (multiple of 8) */
    const void* v;              /* [N * tokens_per_seq, Hv, dv] activation dtype */
    long long v_stride_t;       /* elements between rows of v (multiple of 8) */
    long long v_stride_h;       /* elements between heads of v (multiple of 8) */
    const float* g;             /* [N * tokens_per_seq, Hv] f32, head stride 1 */
    long long g_stride_t;       /* elements between rows of g */
    const void* beta;           /* [N * tokens_per_seq, Hv] f32 or activation dtype, head stride 1 */
    long long beta_stride_t;    /* elements between rows of beta */
    int beta_f32;               /* 1: beta is f32; 0: activation dtype */
    int l2norm;                 /* 1: L2-normalise q and k in the kernel */
    void* o;                    /* out [N * tokens_per_seq, Hv, dv] activation dtype */
    long long o_stride_t;       /* elements between rows of o (multiple of 8) */
    long long o_stride_h;       /* elements between heads of o (multiple of 8) */
    int num_qk_heads;           /* Hqk */
    int num_v_heads;            /* Hv */
    int num_r_heads;            /* Hr (labels) */
    float scale;                /* output scale */
    const unsigned char* labels; /* nullable [N, Hr]: label of the chunk a token of this step completes; null = GDN */
    float* running_pool;        /* [P, Hv, dk, dv] f32 in/out: running state */
    const int* running_index;   /* [N] row of running_pool per sequence; -1 (padding) or a row outside [0, running_pool_rows) (a fault): the sequence is skipped (o zero, pools, pos and gsum untouched) */
    int running_pool_rows;      /* P */
    float* committed_pool;      /* nullable [P', Hv, dk, dv] f32 in/out: committed state; null = plain GDN (no commit) */
    const int* committed_index; /* nullable iff committed_pool is null: [N] row of committed_pool; -1 or out of range: as running_index */
    int committed_pool_rows;    /* P' */
    float* gsum;                /* nullable iff committed_pool is null: [N, Hv] f32 in/out, sum of g over the current chunk */
    int* pos;                   /* nullable iff committed_pool is null: [N] i32 in/out, tokens seen per sequence */
    unsigned int* counter;      /* [N] u32 workspace, zero before the first launch; every launch that completes leaves it zero (one that faults loses the context, and the workspace with it) */
    unsigned int* faults;       /* the runtime's device fault word (NATSL_FAULT_*) */
} NatslGdnDecodeParams;

#endif
