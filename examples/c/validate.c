/* The C ABI without a GPU: version query, a runtime that fails cleanly where there
 * is no device, and host-side validation of GDN prefill, sparse prefill and merge calls (a good
 * call passes, bad ones return NATSL_STATUS_INVALID_ARGUMENT naming the argument).
 * CI builds it with the system cc against target/release/libnatsl_capi.so:
 *   cc -std=c99 -Wall -Wextra -Werror -Iinclude examples/c/validate.c \
 *      -Ltarget/release -lnatsl_capi -Wl,-rpath,$PWD/target/release -o target/natsl_validate_c
 */
#include <stdio.h>
#include <string.h>
#include "natsl.h"

static int failures = 0;

#define EXPECT(cond, ...)                          \
    do {                                           \
        if (!(cond)) {                             \
            printf("FAIL %s:%d: ", __FILE__, __LINE__); \
            printf(__VA_ARGS__);                   \
            printf("\n");                          \
            failures++;                            \
        }                                          \
    } while (0)

/* A contiguous descriptor at a fake device address (validation never reads it). */
static NatslTensor tensor(uint64_t ptr, int32_t dtype, int32_t ndim, const int64_t* shape) {
    NatslTensor t;
    memset(&t, 0, sizeof t);
    t.ptr = ptr;
    t.dtype = dtype;
    t.ndim = ndim;
    int64_t s = 1;
    for (int i = ndim - 1; i >= 0; --i) {
        t.shape[i] = shape[i];
        t.strides[i] = s;
        s *= shape[i];
    }
    return t;
}

/* Expect `st` to be an invalid argument whose message names `arg`. */
static void expect_invalid(NatslStatus st, const char* arg, const char* what) {
    char needle[64];
    snprintf(needle, sizeof needle, "`%s`", arg);
    EXPECT(st == NATSL_STATUS_INVALID_ARGUMENT, "%s: status %d, want INVALID_ARGUMENT", what, (int)st);
    EXPECT(strstr(natsl_last_error(), needle) != NULL, "%s: message \"%s\" does not name %s", what, natsl_last_error(), needle);
    printf("ok  %-34s -> %s\n", what, natsl_last_error());
}

int main(void) {
    uint32_t major, minor, patch, abi;
    EXPECT(natsl_version(&major, &minor, &patch, &abi) == NATSL_STATUS_OK, "version");
    EXPECT(abi == NATSL_ABI_VERSION, "abi %u vs header %d", abi, NATSL_ABI_VERSION);
    printf("natsl %u.%u.%u, ABI %u, NVRTC %d\n", major, minor, patch, abi, natsl_nvrtc_major());
    expect_invalid(natsl_version(NULL, &minor, &patch, &abi), "major", "null out-pointer");

    NatslRuntime* rt = NULL;
    NatslStatus st = natsl_runtime_create(&rt);
    if (st == NATSL_STATUS_OK) {
        int32_t arch = 0, sms = 0;
        EXPECT(natsl_runtime_info(rt, &arch, &sms) == NATSL_STATUS_OK, "runtime_info");
        printf("ok  runtime on the current context: sm_%d path, %d SMs\n", arch, sms);
        natsl_runtime_destroy(rt);
    } else {
        EXPECT(st == NATSL_STATUS_NO_DEVICE, "runtime_create without a device: status %d", (int)st);
        EXPECT(rt == NULL, "runtime_create left a handle");
        printf("ok  runtime_create fails cleanly   -> %s\n", natsl_last_error());
    }

    /* GDN prefill: 2 sequences (72 + 128 tokens), Hqk 2, Hv 4, dk = dv = 128, bf16. */
    const int32_t cu[3] = {0, 72, 200};
    const int64_t T = 200, slots = 200 / 64 + 2;
    uint64_t addr = 0x7f0000000000ull;
    /* Each tensor at its own fake address, 1 MiB apart: outputs may not alias inputs. */
#define AT(i) (addr + ((uint64_t)(i) << 20))
    const int64_t qs[3] = {T, 2, 128}, vs[3] = {T, 4, 128}, gs[2] = {T, 4}, ls[2] = {slots, 2};
    NatslGdnPrefillArgs g;
    memset(&g, 0, sizeof g);
    g.q = tensor(AT(1), NATSL_DTYPE_BF16, 3, qs);
    g.k = tensor(AT(2), NATSL_DTYPE_BF16, 3, qs);
    g.v = tensor(AT(3), NATSL_DTYPE_BF16, 3, vs);
    g.g = tensor(AT(4), NATSL_DTYPE_F32, 2, gs);
    g.beta = tensor(AT(5), NATSL_DTYPE_F32, 2, gs);
    g.labels = tensor(AT(6), NATSL_DTYPE_U8, 2, ls);
    g.o = tensor(AT(7), NATSL_DTYPE_BF16, 3, vs);
    st = natsl_gdn_prefill_validate(cu, 3, &g);
    EXPECT(st == NATSL_STATUS_OK, "good GDN prefill: %d %s", (int)st, natsl_last_error());
    printf("ok  good GDN prefill validates\n");

    NatslGdnPrefillArgs bad = g;
    bad.g.dtype = NATSL_DTYPE_BF16;
    expect_invalid(natsl_gdn_prefill_validate(cu, 3, &bad), "g", "GDN g in bf16");
    bad = g;
    bad.v.shape[1] = 3;
    bad.v.strides[0] = 3 * 128;
    expect_invalid(natsl_gdn_prefill_validate(cu, 3, &bad), "v", "GDN 3 value heads over 2 q/k");
    bad = g;
    bad.o.ptr = 0;
    expect_invalid(natsl_gdn_prefill_validate(cu, 3, &bad), "o", "GDN missing output");
    bad = g;
    bad.q.dtype = 42;
    expect_invalid(natsl_gdn_prefill_validate(cu, 3, &bad), "q", "GDN unknown dtype");
    bad = g;
    bad.o.ptr = bad.q.ptr;
    expect_invalid(natsl_gdn_prefill_validate(cu, 3, &bad), "o", "GDN o over q");
    const int32_t cu_bad[3] = {0, 100, 50};
    expect_invalid(natsl_gdn_prefill_validate(cu_bad, 3, &g), "cu_seqlens", "GDN falling cu_seqlens");
    expect_invalid(natsl_gdn_prefill_validate(cu, 3, NULL), "args", "GDN null args");

    /* Sparse prefill over routed lists: Hq 8, Hkv 2, Hr 2, dk 64, dv 128. */
    const int64_t sq[3] = {T, 8, 64}, sk[3] = {T, 2, 64}, sv[3] = {T, 2, 128}, so[3] = {T, 8, 128};
    const int64_t al[2] = {2, slots}, ac[2] = {2, 2};
    NatslSparsePrefillArgs s;
    memset(&s, 0, sizeof s);
    s.q = tensor(AT(8), NATSL_DTYPE_BF16, 3, sq);
    s.k = tensor(AT(9), NATSL_DTYPE_BF16, 3, sk);
    s.v = tensor(AT(10), NATSL_DTYPE_BF16, 3, sv);
    s.attn_list = tensor(AT(11), NATSL_DTYPE_I32, 2, al);
    s.attn_count = tensor(AT(12), NATSL_DTYPE_I32, 2, ac);
    s.o = tensor(AT(13), NATSL_DTYPE_BF16, 3, so);
    st = natsl_sparse_prefill_validate(cu, 3, &s);
    EXPECT(st == NATSL_STATUS_OK, "good sparse prefill: %d %s", (int)st, natsl_last_error());
    printf("ok  good sparse prefill validates\n");
    NatslSparsePrefillArgs sbad = s;
    sbad.attn_count.shape[0] = 3;
    expect_invalid(natsl_sparse_prefill_validate(cu, 3, &sbad), "attn_count", "sparse attn_count rows");
    sbad = s;
    sbad.q.ptr += 2; /* not 16-byte aligned */
    expect_invalid(natsl_sparse_prefill_validate(cu, 3, &sbad), "q", "sparse misaligned q");

    /* Merge epilogue: 12 softmax heads of 128, f32 logits. */
    const int64_t mr[3] = {T, 12, 128}, mw[3] = {T, 12, 2}, mg[1] = {128};
    NatslMergeArgs m;
    memset(&m, 0, sizeof m);
    m.o_gdn = tensor(AT(14), NATSL_DTYPE_BF16, 3, mr);
    m.o_att = tensor(AT(15), NATSL_DTYPE_BF16, 3, mr);
    m.w = tensor(AT(16), NATSL_DTYPE_F32, 3, mw);
    m.gamma_gdn = tensor(AT(17), NATSL_DTYPE_BF16, 1, mg);
    m.gamma_att = tensor(AT(18), NATSL_DTYPE_BF16, 1, mg);
    m.z = tensor(AT(19), NATSL_DTYPE_BF16, 3, mr);
    m.out = tensor(AT(20), NATSL_DTYPE_BF16, 3, mr);
    st = natsl_merge_validate(&m);
    EXPECT(st == NATSL_STATUS_OK, "good merge: %d %s", (int)st, natsl_last_error());
    printf("ok  good merge validates\n");
    NatslMergeArgs mbad = m;
    mbad.out.ptr = mbad.o_att.ptr;
    expect_invalid(natsl_merge_validate(&mbad), "out", "merge out over o_att");
    mbad = m;
    mbad.gamma_att.shape[0] = 64;
    expect_invalid(natsl_merge_validate(&mbad), "gamma_att", "merge short gamma_att");
    expect_invalid(natsl_merge_validate(NULL), "args", "merge null args");

    NatslWorkspace* ws = NULL;
    expect_invalid(natsl_workspace_create_from(addr + 8, 4096, &ws), "ptr", "misaligned caller workspace");
    EXPECT(natsl_workspace_create_from(addr, 4096, &ws) == NATSL_STATUS_OK && ws != NULL, "caller workspace");
    natsl_workspace_destroy(ws);
    EXPECT(natsl_gdn_decode_workspace_bytes(65) == 512, "decode workspace bytes");

    if (failures) {
        printf("%d failed\n", failures);
        return 1;
    }
    printf("natsl C ABI: all checks passed\n");
    return 0;
}
