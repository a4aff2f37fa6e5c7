/* Router (SPEC.md section 3): mean-pool per chunk and score, then select. */
#ifndef NATSL_PARAMS_ROUTER_H
#define NATSL_PARAMS_ROUTER_H

/* Pool kernel: one CTA per (chunk slot, NATSL_ROUTER_TILE_COLS-column slice of D);
 * d_split = the number of slices. */
#define NATSL_ROUTER_TILE_COLS 256
#define NATSL_ROUTER_MAX_HEADS 64

typedef struct NatslRouterParams {
    NatslVarlen batch;
    const void* x;          /* [T, d_model] activation dtype, row stride x_stride_t */
    long long x_stride_t;   /* elements between tokens (>= d_model, multiple of 8) */
    const void* w_score;    /* [2 * num_heads, d_model] activation dtype, contiguous */
    int d_model;            /* D, a multiple of 8, <= 8192 */
    int num_heads;          /* Hr, routing heads, <= 64 */
    int d_split;            /* slices of D: ceil(d_model / NATSL_ROUTER_TILE_COLS) CTAs per chunk (partial logits summed by select) */
    int d_per_split;        /* NATSL_ROUTER_TILE_COLS; read by no kernel since the blocked pool was removed (kept: same layout, same SASS) */
    int round_mean;         /* 1: round m_c to the activation dtype before scoring (the model's rule) */
    int top_k;              /* policy: 0 = argmax; > 0 = keep the top_k complete chunks */
    float keep_fraction;    /* policy when top_k < 0: k = ceil(keep_fraction * complete chunks) */
    float* partial_logits;  /* workspace [d_split, num_slots, num_heads, 2] f32 */
    float* margins;         /* workspace [num_heads, num_slots] f32: l0 - l1 (top-k selection) */
    float* logits;          /* optional (nullable) out [num_slots, num_heads, 2] f32 */
    unsigned char* labels;  /* out [num_slots, num_heads] */
    int* attn_list;         /* out [num_heads, num_slots]: list of (n, r) at r * num_slots + slot_base(n) */
    int* attn_count;        /* out [num_seqs, num_heads] */
} NatslRouterParams;

#endif
