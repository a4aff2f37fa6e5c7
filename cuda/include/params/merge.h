/* Merge epilogue (SPEC.md section 6): per (token, softmax head) row,
 * out = (a * gamma_gdn * rms(o_gdn) + b * gamma_att * rms(o_att)) * z * sigmoid(z),
 * (a, b) = softmax(w[t, h, 0], w[t, h, 1]); weight 0 is the GDN branch. */
#ifndef NATSL_PARAMS_MERGE_H
#define NATSL_PARAMS_MERGE_H

/* Largest number of softmax heads (the grid's y extent). */
#define NATSL_MERGE_MAX_HEADS 65535

typedef struct NatslMergeParams {
    const void* o_gdn;        /* [T, Ha, dvs] activation dtype, strides (o_gdn_stride_t, o_gdn_stride_h, 1) */
    long long o_gdn_stride_t; /* elements; every stride of the row tensors is a multiple of 8 */
    long long o_gdn_stride_h;
    const void* o_att;        /* [T, Ha, dvs] activation dtype */
    long long o_att_stride_t;
    long long o_att_stride_h;
    const void* z;            /* [T, Ha, dvs] activation dtype: the gate */
    long long z_stride_t;
    long long z_stride_h;
    void* out;                /* out [T, Ha, dvs] activation dtype */
    long long out_stride_t;
    long long out_stride_h;
    const void* w;            /* [T, Ha, 2] logits: f32 if w_f32, else the activation dtype */
    long long w_stride_t;
    long long w_stride_h;
    const void* gamma_gdn;    /* [dvs] activation dtype, contiguous */
    const void* gamma_att;    /* [dvs] activation dtype, contiguous */
    int num_tokens;           /* T */
    int num_heads;            /* Ha, <= NATSL_MERGE_MAX_HEADS */
    int w_f32;                /* 1: w is f32; 0: w is the activation dtype */
    float eps;                /* RMSNorm epsilon (1e-6) */
} NatslMergeParams;

#endif
