/* Block-sparse flash softmax (SPEC.md section 5): prefill over routed chunks
 * (or a general FlexAttention-style block list) and decode over paged KV. */
#ifndef NATSL_PARAMS_SPARSE_H
#define NATSL_PARAMS_SPARSE_H

/* Prefill sparsity formats (NatslSparsePrefillParams.mode). */
#define NATSL_SPARSE_ROUTED 0 /* the router's compact ATTN lists */
#define NATSL_SPARSE_BLOCKS 1 /* per (sequence, mask head, query block) KV block lists */

/* K/V ring depth of the sm_90a wgmma prefill (prefill_wgmma entry). */
#define NATSL_SPARSE_WGMMA_STAGES 2

/* Most new queries per sequence in one decode call (1 + up to 7 speculative). */
#define NATSL_SPARSE_MAX_QUERIES 8

/*
 * Prefill. One CTA per (query chunk = 64-token block, query head); query block
 * b of sequence n covers tokens cu_seqlens[n] + 64 b .. + 64 (block indices are
 * local to the sequence, like chunk indices). Query head j uses kv head
 * j / (Hq / Hkv) and mask head j / (Hq / Hm) (= routing head in ROUTED mode).
 *
 * ROUTED: query block c sees, fully, every chunk of attn_list[m] that is < c,
 *   then its own chunk causally. Entries >= c (or < 0) are skipped. The list of
 *   sequence n is its first min(attn_count, C_n) entries (C_n = its chunk count,
 *   which the list's storage always holds).
 * BLOCKS: query block c sees the blocks listed for it: an entry < c fully, an
 *   entry == c causally, an entry > c or < 0 is skipped (causal block-sparse).
 *   A row that sees no key gets o = 0, lse = -inf.
 * Both: lists are strictly ascending. An entry >= 0 that is not greater than every
 *   earlier entry of its list (a repeat, or out of order) is skipped and recorded as
 *   NATSL_FAULT_LIST_ORDER; the entries used are then the list's running maxima, the
 *   same set for every query block. Entries < 0 (padding) are skipped silently.
 */
typedef struct NatslSparsePrefillParams {
    /* The warp-specialised sm_90a entry (prefill_ws) loads q, k, v by TMA: each viewed
     * as a 3-D tensor (dim, head, token) = (dk or dv, H, T) with its strides, boxes of
     * 64 x 1 x 64 elements, 128-byte swizzle, zero fill past T. First: 64-byte aligned
     * with no padding before them. */
    NatslTensorMap tma_q;
    NatslTensorMap tma_k;
    NatslTensorMap tma_v;
    NatslVarlen batch;
    const void* q;           /* [T, Hq, dk] activation dtype; last dim contiguous */
    long long q_stride_t;    /* elements between tokens (multiple of 8) */
    long long q_stride_h;    /* elements between heads (multiple of 8) */
    const void* k;           /* [T, Hkv, dk] */
    long long k_stride_t;
    long long k_stride_h;
    const void* v;           /* [T, Hkv, dv] */
    long long v_stride_t;
    long long v_stride_h;
    void* o;                 /* out [T, Hq, dv] activation dtype */
    long long o_stride_t;
    long long o_stride_h;
    float* lse;              /* nullable out [T, Hq] f32, natural log; element (t, j) at t * lse_stride_t + j */
    long long lse_stride_t;
    const void* q_norm_w;    /* nullable [dk] activation dtype: RMSNorm weight of q (eps norm_eps) */
    const void* k_norm_w;    /* nullable [dk] activation dtype: RMSNorm weight of k */
    float norm_eps;          /* RMSNorm epsilon (1e-6) */
    float scale_log2;        /* softmax scale * log2(e) */
    int num_q_heads;         /* Hq, a multiple of Hkv */
    int num_kv_heads;        /* Hkv */
    int num_mask_heads;      /* Hm, divides Hq (ROUTED: Hr, divides Hkv) */
    int mode;                /* NATSL_SPARSE_ROUTED or NATSL_SPARSE_BLOCKS */
    const int* attn_list;    /* ROUTED: [Hm, num_slots], list of (n, m) at m * num_slots + slot_base(n), strictly ascending */
    const int* attn_count;   /* ROUTED: [N, Hm] list lengths */
    const int* kv_num_blocks;/* BLOCKS: [N, Hm, max_q_blocks] list lengths */
    const int* kv_indices;   /* BLOCKS: [N, Hm, max_q_blocks, max_kv_blocks] strictly ascending block indices */
    int max_q_blocks;        /* BLOCKS: >= batch.max_chunks */
    int max_kv_blocks;       /* BLOCKS: capacity of each list */
    /* prefill_ws: the persistent tile scheduler's two counters (next dynamic tile, CTAs
     * done fetching), zero before a launch; the launch's last CTA rewinds them to zero.
     * One pair per stream (launches on one stream are ordered). Unused by other entries. */
    int* tile_counter;
    unsigned int* faults;    /* the runtime's device fault word (NATSL_FAULT_*) */
} NatslSparsePrefillParams;

/*
 * Decode over a paged KV cache. A page is one 64-token chunk of every kv head:
 *   k_pages [P, 64, Hkv, dk], v_pages [P, 64, Hkv, dv] (strides per page, token, head).
 * Per (sequence n, table head h) the kept (ATTN) pages are
 *   page_table[(n * Ht + h) * max_pages + i], i < page_count[n * Ht + h] (any order);
 * kv head g uses table head g / (Hkv / Ht). The current, partial chunk of sequence n
 * is page cur_page[n] holding cur_len[n] tokens (1..64), the last nq of them the new
 * ones: query m (0..nq) of sequence n is row n * nq + m of q and sits at position
 * cur_len[n] - nq + m of its page; it sees that page causally plus every kept page.
 * Page ids outside [0, num_pages) are skipped (-1 silently, others as a fault); lengths are
 * clamped (a fault; never out of bounds). A padded sequence: cur_page -1, page_count 0.
 *
 * Grid: N * Hkv * row_tiles * num_splits CTAs. A CTA takes 16 of the R = (Hq/Hkv) * nq
 * query rows of one kv head (all GQA heads read each KV byte once) and the entries
 * [s * pages_per_split, (s + 1) * pages_per_split) of the list kept pages + current page.
 * With num_splits > 1 it writes normalised f32 partials and the combine entry merges them.
 */
typedef struct NatslSparseDecodeParams {
    const void* q;           /* [N * nq, Hq, dk] activation dtype */
    long long q_stride_t;
    long long q_stride_h;
    const void* k_pages;     /* [P, 64, Hkv, dk] */
    long long k_stride_page;
    long long k_stride_t;
    long long k_stride_h;
    const void* v_pages;     /* [P, 64, Hkv, dv] */
    long long v_stride_page;
    long long v_stride_t;
    long long v_stride_h;
    void* o;                 /* out [N * nq, Hq, dv] activation dtype */
    long long o_stride_t;
    long long o_stride_h;
    float* lse;              /* nullable out [N * nq, Hq] f32, natural log; (row, j) at row * lse_stride_t + j */
    long long lse_stride_t;
    const void* q_norm_w;    /* nullable [dk] RMSNorm weight of q */
    const void* k_norm_w;    /* nullable [dk] RMSNorm weight of k */
    float norm_eps;          /* RMSNorm epsilon */
    float scale_log2;        /* softmax scale * log2(e) */
    const int* page_table;   /* [N, Ht, max_pages] contiguous */
    const int* page_count;   /* [N, Ht] */
    const int* cur_page;     /* [N] page id of the current chunk */
    const int* cur_len;      /* [N] tokens in the current page, new ones included */
    int num_seqs;            /* N */
    int num_queries;         /* nq, 1..NATSL_SPARSE_MAX_QUERIES */
    int num_q_heads;         /* Hq, a multiple of Hkv */
    int num_kv_heads;        /* Hkv */
    int num_table_heads;     /* Ht, divides Hkv */
    int num_pages;           /* P */
    int max_pages;           /* capacity of each page list */
    int row_tiles;           /* ceil((Hq / Hkv) * nq / 16) */
    int num_splits;          /* KV splits per (n, kv head, row tile) */
    int pages_per_split;     /* list entries per split; num_splits * pages_per_split >= max_pages + 1 */
    float* part_o;           /* workspace [num_splits, N * nq, Hq, dv] f32 (num_splits > 1) */
    float* part_lse;         /* workspace [num_splits, N * nq, Hq] f32, log2 units, -inf = empty */
    unsigned int* faults;    /* the runtime's device fault word (NATSL_FAULT_*) */
} NatslSparseDecodeParams;

#endif
