/*
 * natsl_params.h: the whole host/kernel ABI of natsl.
 *
 * Every kernel takes exactly one of these structs by value. The Rust side
 * (src/params.rs) is generated from this header by bindgen and committed;
 * tests/params_fresh.rs fails when the two drift apart.
 *
 * Rules: plain C, fixed-width fields only (int, long long, float, pointers,
 * NatslTensorMap),
 * strides in elements (not bytes), every pointer a device pointer,
 * nullable pointers say so. One family per file under params/.
 */
#ifndef NATSL_PARAMS_H
#define NATSL_PARAMS_H

/* Tokens per chunk: the unit of routing, of the GDN chunk scan and of KV pages. */
#define NATSL_CHUNK 64

/* Label values (u8 per chunk slot and routing head). */
#define NATSL_LABEL_GDN 0
#define NATSL_LABEL_ATTN 1
#define NATSL_LABEL_PARTIAL 2 /* an incomplete last chunk: not labelled yet */

/*
 * Device faults: inputs that live in device memory (state-pool indices, labels, page
 * tables, block lists) cannot be checked on the host without a sync. Kernels treat a bad one as stated
 * below and set its bit in the runtime's fault word (`faults` in the params, atomicOr, only
 * on the faulting path); Runtime::device_faults() reads and clears it. Index -1 is never a
 * fault: it marks a padded slot (engines pad captured batches with -1) and is skipped.
 */
#define NATSL_FAULT_POOL_INDEX 1u /* a state-pool index outside [-1, rows): skipped like -1 */
#define NATSL_FAULT_LABEL 2u      /* a label other than 0, 1, 2: read as GDN */
#define NATSL_FAULT_PAGE_ID 4u    /* a page id outside [-1, num_pages): the page is skipped */
#define NATSL_FAULT_PAGE_LEN 8u   /* a page_count outside [0, max_pages] or cur_len outside [0, 64]: clamped */
#define NATSL_FAULT_LIST_ORDER 16u /* a sparse-prefill list entry >= 0 not above every earlier entry of its list: skipped */

/*
 * A packed variable-length batch. Chunk c of sequence n lives at chunk slot
 * cu_seqlens[n] / 64 + n + c, so per-chunk storage needs no prefix sum:
 * num_slots = total_tokens / 64 + num_seqs bounds every slot.
 */
typedef struct NatslVarlen {
    const int* cu_seqlens; /* [num_seqs + 1], rising, cu_seqlens[0] = 0 */
    int num_seqs;          /* N */
    int total_tokens;      /* T = cu_seqlens[N] */
    int num_slots;         /* T / 64 + N */
    int max_chunks;        /* max over sequences of ceil(len / 64) */
} NatslVarlen;

/*
 * A TMA tensor map (the driver's CUtensorMap: 128 opaque bytes, 64-byte aligned),
 * encoded on the host by cuTensorMapEncodeTiled. Kernels that read one take their
 * params struct as a __grid_constant__. All zero where the launched kernel uses none.
 */
typedef struct NatslTensorMap {
    unsigned long long opaque[16];
} __attribute__((aligned(64))) NatslTensorMap;

#include "params/router.h"
#include "params/gdn.h"
#include "params/sparse.h"
#include "params/merge.h"

#endif /* NATSL_PARAMS_H */
