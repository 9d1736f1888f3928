/* C launchers of the time-gated LoRA linear: the grids and argument lists of
 * apo_fast/ops/gated_lora.py (gated_lora_forward, gated_lora_backward,
 * _project, _token_splits), argument for argument, with each kernel's first
 * (default) autotune config. */
#include <math.h>

#include "apo_fast_kernels_args.h"
#include "apo_fk_internal.h"

/* Padded ranks compiled: IN_LOOP_MAX_R_PAD (h and u accumulated in the main loop) and MAX_RANK. */
#define IN_LOOP_MAX_R_PAD APO_FK_GL_IN_LOOP_MAX_R_PAD
#define MAX_RANK APO_FK_GL_MAX_RANK
#define DADB_COLUMN_TILE 64  /* the Python launcher sizes the splits with 64-wide column tiles */
#define DADB_PROGRAMS_PER_SM 2

/* A descriptor with its defaults filled in and checked. */
typedef struct gl_shape {
    apo_fk_gated_lora_desc d;
    int32_t r_pad;
    int in_loop;
} gl_shape;

static int fits_i32(int64_t v) { return v >= 0 && v <= APO_FK_INT32_MAX; }

static apo_fk_status gl_check(const apo_fk_gated_lora_desc *desc, gl_shape *s) {
    if (desc == NULL) return APO_FK_ERROR_INVALID_ARGUMENT;
    if (desc->dtype != APO_FK_DTYPE_FP16 && desc->dtype != APO_FK_DTYPE_BF16) return APO_FK_ERROR_UNSUPPORTED_DTYPE;
    apo_fk_gated_lora_desc d = *desc;
    if (d.tokens < 1 || d.in_features < 1 || d.out_features < 1 || d.rank < 1 || d.tokens_per_sample < 1 ||
        d.gate_row_stride < 0 || !isfinite(d.scaling)) {
        return APO_FK_ERROR_INVALID_ARGUMENT;
    }
    if (d.ld_x == 0) d.ld_x = d.in_features;
    if (d.ld_weight == 0) d.ld_weight = d.in_features;
    if (d.ld_lora_a == 0) d.ld_lora_a = d.in_features;
    if (d.ld_lora_b == 0) d.ld_lora_b = d.rank;
    if (d.ld_y == 0) d.ld_y = d.out_features;
    if (d.ld_x < d.in_features || d.ld_weight < d.in_features || d.ld_lora_a < d.in_features ||
        d.ld_lora_b < d.rank || d.ld_y < d.out_features) {
        return APO_FK_ERROR_INVALID_ARGUMENT;
    }
    if (d.rank > MAX_RANK) return APO_FK_ERROR_UNSUPPORTED_SHAPE;
    /* Offsets inside the kernels are 32-bit. */
    const int64_t extents[] = {d.tokens * d.ld_x, d.out_features * d.ld_weight, d.rank * d.ld_lora_a,
                               d.out_features * d.ld_lora_b, d.tokens * d.ld_y, d.tokens * d.rank,
                               d.tokens_per_sample, d.gate_row_stride};
    for (size_t i = 0; i < sizeof extents / sizeof extents[0]; ++i) {
        if (!fits_i32(extents[i])) return APO_FK_ERROR_UNSUPPORTED_SHAPE;
    }
    if (d.tokens > APO_FK_INT32_MAX / d.ld_x || d.tokens > APO_FK_INT32_MAX / d.ld_y) {
        return APO_FK_ERROR_UNSUPPORTED_SHAPE;
    }
    /* The compiled variants promise these are multiples of 16 (i32:16 in the signature). */
    const int64_t by16[] = {d.in_features, d.out_features, d.ld_x, d.ld_weight, d.ld_lora_a, d.ld_y};
    for (size_t i = 0; i < sizeof by16 / sizeof by16[0]; ++i) {
        if (by16[i] % 16 != 0) return APO_FK_ERROR_UNSUPPORTED_SHAPE;
    }
    s->d = d;
    s->r_pad = d.rank <= IN_LOOP_MAX_R_PAD ? IN_LOOP_MAX_R_PAD : MAX_RANK;
    s->in_loop = s->r_pad <= IN_LOOP_MAX_R_PAD;
    return APO_FK_OK;
}

/* Every pointer non-NULL (INVALID_ARGUMENT) and 16-byte aligned (UNSUPPORTED_SHAPE). */
static apo_fk_status gl_pointers(const void *const *ptrs, size_t n) {
    for (size_t i = 0; i < n; ++i) {
        if (ptrs[i] == NULL) return APO_FK_ERROR_INVALID_ARGUMENT;
    }
    for (size_t i = 0; i < n; ++i) {
        if (!apo_fk_aligned16(ptrs[i])) return APO_FK_ERROR_UNSUPPORTED_SHAPE;
    }
    return APO_FK_OK;
}

static int gl_variant(int kernel, const apo_fk_device *device, const gl_shape *s, int32_t k1) {
    const int32_t key[4] = {s->r_pad, k1, 0, 0};
    return apo_fk_find_variant(kernel, device->arch, (int32_t)s->d.dtype, key);
}

/* out (M, rank) = x (M, C) F^T with F[j, c] at f + j * stride_fr + c * stride_fc (the Python _project). */
static apo_fk_status gl_project(const apo_fk_device *device, void *stream, const gl_shape *s, const void *x,
                                int64_t rows, int64_t cols, int64_t ld_x, const void *f, int64_t stride_fr,
                                int64_t stride_fc, void *out, int out_fp32) {
    const int index = gl_variant(APO_FK_KERNEL_GL_PROJECT, device, s, out_fp32);
    if (index < 0) return APO_FK_ERROR_INTERNAL;
    const apo_fk_variant *v = &apo_fk_variant_table[index];
    CUdeviceptr x_ptr = apo_fk_devptr(x), f_ptr = apo_fk_devptr(f), out_ptr = apo_fk_devptr(out);
    int32_t M = (int32_t)rows, C = (int32_t)cols, rank = (int32_t)s->d.rank;
    int32_t stride_xm = (int32_t)ld_x, stride_fr_ = (int32_t)stride_fr, stride_fc_ = (int32_t)stride_fc;
    int32_t stride_om = rank;
    void *slots[APO_FK_NARGS_GL_PROJECT] = {0};
    APO_FK_ARG(slots, GL_PROJECT, x_ptr, x_ptr);
    APO_FK_ARG(slots, GL_PROJECT, f_ptr, f_ptr);
    APO_FK_ARG(slots, GL_PROJECT, out_ptr, out_ptr);
    APO_FK_ARG(slots, GL_PROJECT, M, M);
    APO_FK_ARG(slots, GL_PROJECT, C, C);
    APO_FK_ARG(slots, GL_PROJECT, rank, rank);
    APO_FK_ARG(slots, GL_PROJECT, stride_xm, stride_xm);
    APO_FK_ARG(slots, GL_PROJECT, stride_fr, stride_fr_);
    APO_FK_ARG(slots, GL_PROJECT, stride_fc, stride_fc_);
    APO_FK_ARG(slots, GL_PROJECT, stride_om, stride_om);
    return apo_fk_launch(device, index, apo_fk_cdiv(rows, v->tiles[APO_FK_TILE_M]), 1, stream, slots);
}

apo_fk_status apo_fk_gated_lora_forward(void *stream, const apo_fk_gated_lora_desc *desc, const void *x,
                                        const void *weight, const void *bias, const void *lora_a,
                                        const void *lora_b, const float *gate, void *y, void *h) {
    gl_shape s;
    apo_fk_status status = gl_check(desc, &s);
    if (status != APO_FK_OK) return status;
    const void *required[] = {x, weight, lora_a, lora_b, gate, y, h};
    status = gl_pointers(required, sizeof required / sizeof required[0]);
    if (status != APO_FK_OK) return status;
    if (bias != NULL && !apo_fk_aligned16(bias)) return APO_FK_ERROR_UNSUPPORTED_SHAPE;
    apo_fk_device device;
    status = apo_fk_kernel_device(&device);
    if (status != APO_FK_OK) return status;
    const apo_fk_gated_lora_desc *d = &s.d;

    const int index = gl_variant(APO_FK_KERNEL_GL_FORWARD, &device, &s, bias != NULL);
    if (index < 0) return APO_FK_ERROR_INTERNAL;
    if (!s.in_loop) {
        /* Large ranks: h = x A^T first (F = A: rank stride ld_lora_a, column stride 1). */
        status = gl_project(&device, stream, &s, x, d->tokens, d->in_features, d->ld_x, lora_a, d->ld_lora_a, 1, h,
                            0);
        if (status != APO_FK_OK) return status;
    }
    const apo_fk_variant *v = &apo_fk_variant_table[index];
    CUdeviceptr x_ptr = apo_fk_devptr(x), w_ptr = apo_fk_devptr(weight);
    CUdeviceptr bias_ptr = apo_fk_devptr(bias != NULL ? bias : y);
    CUdeviceptr a_ptr = apo_fk_devptr(lora_a), b_ptr = apo_fk_devptr(lora_b), gate_ptr = apo_fk_devptr(gate);
    CUdeviceptr y_ptr = apo_fk_devptr(y), h_ptr = apo_fk_devptr(h);
    int32_t M = (int32_t)d->tokens, N = (int32_t)d->out_features, K = (int32_t)d->in_features;
    int32_t rank = (int32_t)d->rank, tokens_per_sample = (int32_t)d->tokens_per_sample;
    float scaling = (float)d->scaling;
    int32_t stride_xm = (int32_t)d->ld_x, stride_wn = (int32_t)d->ld_weight, stride_am = (int32_t)d->ld_lora_a;
    int32_t stride_bn = (int32_t)d->ld_lora_b, stride_gs = (int32_t)d->gate_row_stride;
    int32_t stride_ym = (int32_t)d->ld_y, stride_hm = rank;
    void *slots[APO_FK_NARGS_GL_FORWARD] = {0};
    APO_FK_ARG(slots, GL_FORWARD, x_ptr, x_ptr);
    APO_FK_ARG(slots, GL_FORWARD, w_ptr, w_ptr);
    APO_FK_ARG(slots, GL_FORWARD, bias_ptr, bias_ptr);
    APO_FK_ARG(slots, GL_FORWARD, a_ptr, a_ptr);
    APO_FK_ARG(slots, GL_FORWARD, b_ptr, b_ptr);
    APO_FK_ARG(slots, GL_FORWARD, gate_ptr, gate_ptr);
    APO_FK_ARG(slots, GL_FORWARD, y_ptr, y_ptr);
    APO_FK_ARG(slots, GL_FORWARD, h_ptr, h_ptr);
    APO_FK_ARG(slots, GL_FORWARD, M, M);
    APO_FK_ARG(slots, GL_FORWARD, N, N);
    APO_FK_ARG(slots, GL_FORWARD, K, K);
    APO_FK_ARG(slots, GL_FORWARD, rank, rank);
    APO_FK_ARG(slots, GL_FORWARD, tokens_per_sample, tokens_per_sample);
    APO_FK_ARG(slots, GL_FORWARD, scaling, scaling);
    APO_FK_ARG(slots, GL_FORWARD, stride_xm, stride_xm);
    APO_FK_ARG(slots, GL_FORWARD, stride_wn, stride_wn);
    APO_FK_ARG(slots, GL_FORWARD, stride_am, stride_am);
    APO_FK_ARG(slots, GL_FORWARD, stride_bn, stride_bn);
    APO_FK_ARG(slots, GL_FORWARD, stride_gs, stride_gs);
    APO_FK_ARG(slots, GL_FORWARD, stride_ym, stride_ym);
    APO_FK_ARG(slots, GL_FORWARD, stride_hm, stride_hm);
    const int64_t grid = apo_fk_cdiv(d->tokens, v->tiles[APO_FK_TILE_M]) *
                         apo_fk_cdiv(d->out_features, v->tiles[APO_FK_TILE_N]);
    return apo_fk_launch(&device, index, grid, 1, stream, slots);
}

apo_fk_status apo_fk_gated_lora_backward_dx(void *stream, const apo_fk_gated_lora_desc *desc, const void *dy,
                                            const void *weight, const void *lora_a, const void *lora_b,
                                            const float *gate, void *dx, float *u) {
    gl_shape s;
    apo_fk_status status = gl_check(desc, &s);
    if (status != APO_FK_OK) return status;
    const void *required[] = {dy, weight, lora_a, lora_b, gate, dx, u};
    status = gl_pointers(required, sizeof required / sizeof required[0]);
    if (status != APO_FK_OK) return status;
    apo_fk_device device;
    status = apo_fk_kernel_device(&device);
    if (status != APO_FK_OK) return status;
    const apo_fk_gated_lora_desc *d = &s.d;

    const int index = gl_variant(APO_FK_KERNEL_GL_BACKWARD_DX, &device, &s, 0);
    if (index < 0) return APO_FK_ERROR_INTERNAL;
    if (!s.in_loop) {
        /* Large ranks: u = dy B first, in float32 (F = B^T: rank stride 1, column stride ld_lora_b). */
        status = gl_project(&device, stream, &s, dy, d->tokens, d->out_features, d->ld_y, lora_b, 1, d->ld_lora_b, u,
                            1);
        if (status != APO_FK_OK) return status;
    }
    const apo_fk_variant *v = &apo_fk_variant_table[index];
    CUdeviceptr dy_ptr = apo_fk_devptr(dy), w_ptr = apo_fk_devptr(weight), a_ptr = apo_fk_devptr(lora_a);
    CUdeviceptr b_ptr = apo_fk_devptr(lora_b), gate_ptr = apo_fk_devptr(gate), dx_ptr = apo_fk_devptr(dx);
    CUdeviceptr u_ptr = apo_fk_devptr(u);
    int32_t M = (int32_t)d->tokens, N = (int32_t)d->out_features, K = (int32_t)d->in_features;
    int32_t rank = (int32_t)d->rank, tokens_per_sample = (int32_t)d->tokens_per_sample;
    float scaling = (float)d->scaling;
    int32_t stride_dym = (int32_t)d->ld_y, stride_wn = (int32_t)d->ld_weight, stride_am = (int32_t)d->ld_lora_a;
    int32_t stride_bn = (int32_t)d->ld_lora_b, stride_gs = (int32_t)d->gate_row_stride;
    int32_t stride_dxm = (int32_t)d->ld_x, stride_um = rank;
    void *slots[APO_FK_NARGS_GL_BACKWARD_DX] = {0};
    APO_FK_ARG(slots, GL_BACKWARD_DX, dy_ptr, dy_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DX, w_ptr, w_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DX, a_ptr, a_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DX, b_ptr, b_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DX, gate_ptr, gate_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DX, dx_ptr, dx_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DX, u_ptr, u_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DX, M, M);
    APO_FK_ARG(slots, GL_BACKWARD_DX, N, N);
    APO_FK_ARG(slots, GL_BACKWARD_DX, K, K);
    APO_FK_ARG(slots, GL_BACKWARD_DX, rank, rank);
    APO_FK_ARG(slots, GL_BACKWARD_DX, tokens_per_sample, tokens_per_sample);
    APO_FK_ARG(slots, GL_BACKWARD_DX, scaling, scaling);
    APO_FK_ARG(slots, GL_BACKWARD_DX, stride_dym, stride_dym);
    APO_FK_ARG(slots, GL_BACKWARD_DX, stride_wn, stride_wn);
    APO_FK_ARG(slots, GL_BACKWARD_DX, stride_am, stride_am);
    APO_FK_ARG(slots, GL_BACKWARD_DX, stride_bn, stride_bn);
    APO_FK_ARG(slots, GL_BACKWARD_DX, stride_gs, stride_gs);
    APO_FK_ARG(slots, GL_BACKWARD_DX, stride_dxm, stride_dxm);
    APO_FK_ARG(slots, GL_BACKWARD_DX, stride_um, stride_um);
    const int64_t grid = apo_fk_cdiv(d->tokens, v->tiles[APO_FK_TILE_M]) *
                         apo_fk_cdiv(d->in_features, v->tiles[APO_FK_TILE_K]);
    return apo_fk_launch(&device, index, grid, 1, stream, slots);
}

static int32_t split_granule(int32_t r_pad) {
    return r_pad <= IN_LOOP_MAX_R_PAD ? APO_FK_GL_SPLIT_GRANULE_IN_LOOP : APO_FK_GL_SPLIT_GRANULE_CHUNKED;
}

apo_fk_status apo_fk_gated_lora_dadb_splits(const apo_fk_gated_lora_desc *desc, int sm_count, int *splits,
                                            int *tokens_per_split) {
    gl_shape s;
    apo_fk_status status = gl_check(desc, &s);
    if (status != APO_FK_OK) return status;
    if (splits == NULL || tokens_per_split == NULL || sm_count < 0) return APO_FK_ERROR_INVALID_ARGUMENT;
    if (sm_count == 0) {
        apo_fk_device device;
        status = apo_fk_current_device(&device);
        if (status != APO_FK_OK) return status;
        sm_count = device.sm_count;
    }
    /* _token_splits(M, col_tiles, granule): about two programs per SM. */
    const int64_t M = s.d.tokens, granule = split_granule(s.r_pad);
    const int64_t col_tiles =
        apo_fk_cdiv(s.d.in_features, DADB_COLUMN_TILE) + apo_fk_cdiv(s.d.out_features, DADB_COLUMN_TILE);
    const int64_t programs = (int64_t)DADB_PROGRAMS_PER_SM * sm_count;
    int64_t n = apo_fk_cdiv(programs, col_tiles > 1 ? col_tiles : 1);
    const int64_t by_granule = apo_fk_cdiv(M, granule);
    if (n > by_granule) n = by_granule;
    if (n < 1) n = 1;
    const int64_t per_split = apo_fk_cdiv(apo_fk_cdiv(M, n), granule) * granule;
    *splits = (int)apo_fk_cdiv(M, per_split);
    *tokens_per_split = (int)per_split;
    return APO_FK_OK;
}

apo_fk_status apo_fk_gated_lora_backward_dadb(void *stream, const apo_fk_gated_lora_desc *desc, int splits,
                                              int tokens_per_split, const void *x, const void *h, const void *dy,
                                              const float *u, const float *gate, float *da_partials,
                                              float *dbt_partials) {
    gl_shape s;
    apo_fk_status status = gl_check(desc, &s);
    if (status != APO_FK_OK) return status;
    const apo_fk_gated_lora_desc *d = &s.d;
    /* Every token in exactly one split; the split length carries a divisibility-by-16 hint. */
    if (splits < 1 || tokens_per_split < 1 || tokens_per_split % 16 != 0 ||
        (int64_t)splits * tokens_per_split < d->tokens || (int64_t)(splits - 1) * tokens_per_split >= d->tokens ||
        splits > 65535) {
        return APO_FK_ERROR_INVALID_ARGUMENT;
    }
    if (!fits_i32((int64_t)splits * d->rank * d->in_features) ||
        !fits_i32((int64_t)splits * d->rank * d->out_features)) {
        return APO_FK_ERROR_UNSUPPORTED_SHAPE;
    }
    const void *required[] = {x, h, dy, u, gate, da_partials, dbt_partials};
    status = gl_pointers(required, sizeof required / sizeof required[0]);
    if (status != APO_FK_OK) return status;
    apo_fk_device device;
    status = apo_fk_kernel_device(&device);
    if (status != APO_FK_OK) return status;

    const int index = gl_variant(APO_FK_KERNEL_GL_BACKWARD_DADB, &device, &s, 0);
    if (index < 0) return APO_FK_ERROR_INTERNAL;
    const apo_fk_variant *v = &apo_fk_variant_table[index];
    CUdeviceptr u_ptr = apo_fk_devptr(u), x_ptr = apo_fk_devptr(x), h_ptr = apo_fk_devptr(h);
    CUdeviceptr dy_ptr = apo_fk_devptr(dy), gate_ptr = apo_fk_devptr(gate);
    CUdeviceptr da_part_ptr = apo_fk_devptr(da_partials), dbt_part_ptr = apo_fk_devptr(dbt_partials);
    int32_t M = (int32_t)d->tokens, N = (int32_t)d->out_features, K = (int32_t)d->in_features;
    int32_t rank = (int32_t)d->rank, tokens_per_sample = (int32_t)d->tokens_per_sample;
    float scaling = (float)d->scaling;
    int32_t tokens_per_split_ = tokens_per_split;
    int32_t stride_um = rank, stride_xm = (int32_t)d->ld_x, stride_hm = rank, stride_dym = (int32_t)d->ld_y;
    int32_t stride_gs = (int32_t)d->gate_row_stride;
    int32_t stride_das = rank * K, stride_dar = K, stride_dbs = rank * N, stride_dbr = N;
    void *slots[APO_FK_NARGS_GL_BACKWARD_DADB] = {0};
    APO_FK_ARG(slots, GL_BACKWARD_DADB, u_ptr, u_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, x_ptr, x_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, h_ptr, h_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, dy_ptr, dy_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, gate_ptr, gate_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, da_part_ptr, da_part_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, dbt_part_ptr, dbt_part_ptr);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, M, M);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, N, N);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, K, K);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, rank, rank);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, tokens_per_sample, tokens_per_sample);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, scaling, scaling);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, tokens_per_split, tokens_per_split_);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, stride_um, stride_um);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, stride_xm, stride_xm);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, stride_hm, stride_hm);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, stride_dym, stride_dym);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, stride_gs, stride_gs);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, stride_das, stride_das);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, stride_dar, stride_dar);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, stride_dbs, stride_dbs);
    APO_FK_ARG(slots, GL_BACKWARD_DADB, stride_dbr, stride_dbr);
    const int64_t block_c = v->tiles[APO_FK_TILE_C];
    const int64_t grid_x = apo_fk_cdiv(d->in_features, block_c) + apo_fk_cdiv(d->out_features, block_c);
    return apo_fk_launch(&device, index, grid_x, splits, stream, slots);
}
