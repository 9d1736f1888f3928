/* C launchers of the fused APO loss: the plan, grids and argument lists of
 * apo_fast/ops/apo_loss.py (prepare_inputs, launch_residual_sums,
 * launch_finalize, launch_grad), argument for argument. */
#include <math.h>
#include <string.h>

#include "apo_fast_kernels_args.h"
#include "apo_fk_internal.h"

/* Constants of apo_fast/ops/apo_loss.py and apo_fast/kernels/apo_loss.py (GPU values). */
#define MAX_SAMPLE_NUMEL (2147483648LL - 1048576LL) /* 2**31 - 2**20 */
#define MAX_CHUNKS 1024
#define CHUNK_ALIGN 512          /* GPU_CHUNK_ALIGN */
#define PROGRAMS_PER_SM 8
#define MASK_NONE 0
#define MASK_DIRECT 1
#define MASK_DIV 2
/* From the generated header (apo_fast/kernels_aot.py): the channels_last broadcast-mask
 * kernels' C, the streaming blocks (the large one when the chunk holds it, as the Python
 * autotuner prunes blocks longer than the chunk) and the finalize tiles' BLOCK_CHUNKS. */
#define MASK_DIV_CHANNELS APO_FK_MASK_DIV_CHANNELS
#define SMALL_BLOCK APO_FK_STREAM_BLOCK_SMALL
#define LARGE_BLOCK APO_FK_STREAM_BLOCK_LARGE
static const int32_t finalize_block_chunks[] = APO_FK_FINALIZE_BLOCK_CHUNKS;

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

apo_fk_status apo_fk_loss_plan_make(const apo_fk_loss_desc *desc, int sm_count, apo_fk_loss_plan *plan) {
    if (desc == NULL || plan == NULL) return APO_FK_ERROR_INVALID_ARGUMENT;
    if (!apo_fk_dtype_valid(desc->dtype)) return APO_FK_ERROR_UNSUPPORTED_DTYPE;
    if (desc->layout != APO_FK_LAYOUT_CONTIGUOUS && desc->layout != APO_FK_LAYOUT_CHANNELS_LAST) {
        return APO_FK_ERROR_INVALID_ARGUMENT;
    }
    const int64_t B = desc->n_samples, C = desc->channels, S = desc->spatial;
    if (B < 1 || C < 1 || S < 1) return APO_FK_ERROR_INVALID_ARGUMENT;
    if (desc->paired != 0 && desc->paired != 1) return APO_FK_ERROR_INVALID_ARGUMENT;
    if (desc->paired && B % 2 != 0) return APO_FK_ERROR_INVALID_ARGUMENT;
    if (desc->mask_channels != 0 && desc->mask_channels != 1 && desc->mask_channels != C) {
        return APO_FK_ERROR_INVALID_ARGUMENT;
    }
    if (!(desc->lambda_mask >= 0.0) || !isfinite(desc->lambda_mask) || !(desc->lambda_sft >= 0.0) ||
        !isfinite(desc->lambda_sft) || !isfinite(desc->beta)) {
        return APO_FK_ERROR_INVALID_ARGUMENT;
    }
    if (C >= MAX_SAMPLE_NUMEL || S >= MAX_SAMPLE_NUMEL || C * S >= MAX_SAMPLE_NUMEL) {
        return APO_FK_ERROR_UNSUPPORTED_SHAPE; /* in-sample offsets are 32-bit */
    }
    if (B > APO_FK_INT32_MAX) return APO_FK_ERROR_UNSUPPORTED_SHAPE;
    if (sm_count < 0) return APO_FK_ERROR_INVALID_ARGUMENT;
    if (sm_count == 0) {
        apo_fk_device device;
        apo_fk_status status = apo_fk_current_device(&device);
        if (status != APO_FK_OK) return status;
        sm_count = device.sm_count;
    }

    apo_fk_loss_plan p;
    memset(&p, 0, sizeof p);
    p.desc = *desc;
    p.n_terms = desc->paired ? B / 2 : B;
    const int64_t numel = C * S;
    p.sample_numel = numel;
    p.positions = numel;
    p.repeats = 1;
    p.repeat_stride = numel;
    p.mask_mode = MASK_NONE;
    p.mask_div = 1;
    p.mask_sample_numel = numel;
    /* apo_fast.ops.apo_loss.fused_apo_loss drops the mask when lambda_mask == 1 (w == 1). */
    if (desc->mask_channels != 0 && desc->lambda_mask != 1.0) {
        const int broadcast = desc->mask_channels == 1 && C != 1;
        if (!broadcast) {
            p.mask_mode = MASK_DIRECT;
        } else if (desc->layout == APO_FK_LAYOUT_CHANNELS_LAST) {
            if (C != MASK_DIV_CHANNELS) return APO_FK_ERROR_UNSUPPORTED_SHAPE;
            p.mask_mode = MASK_DIV;
            p.mask_div = C;
            p.mask_sample_numel = S;
        } else {
            p.positions = S;
            p.repeats = C;
            p.repeat_stride = S;
            p.mask_mode = MASK_DIRECT;
            p.mask_sample_numel = S;
        }
    }
    const int64_t target_programs = (int64_t)PROGRAMS_PER_SM * sm_count;
    const int64_t per_sample =
        max64(1, min64(MAX_CHUNKS, min64(apo_fk_cdiv(target_programs, B), apo_fk_cdiv(p.positions, CHUNK_ALIGN))));
    p.chunk = apo_fk_cdiv(apo_fk_cdiv(p.positions, per_sample), CHUNK_ALIGN) * CHUNK_ALIGN;
    p.n_chunks = apo_fk_cdiv(p.positions, p.chunk);
    p.partials_floats = B * p.n_chunks * 2;
    p.stats_floats = 3 * B + APO_FK_LOSS_NUM_METRICS;
    *plan = p;
    return APO_FK_OK;
}

/* The streaming kernels' size arguments carry a divisibility-by-16 hint in the aligned variants. */
static int sizes_aligned(const apo_fk_loss_plan *p) {
    return p->sample_numel % 16 == 0 && p->mask_sample_numel % 16 == 0 && p->positions % 16 == 0 &&
           p->repeat_stride % 16 == 0;
}

static int32_t stream_block(const apo_fk_loss_plan *p, int aligned) {
    /* The generic variants are compiled with the small block only. */
    return aligned && p->chunk >= LARGE_BLOCK ? LARGE_BLOCK : SMALL_BLOCK;
}

static apo_fk_status check_plan(const apo_fk_loss_plan *plan) {
    if (plan == NULL) return APO_FK_ERROR_INVALID_ARGUMENT;
    if (!apo_fk_dtype_valid(plan->desc.dtype)) return APO_FK_ERROR_UNSUPPORTED_DTYPE;
    if (plan->n_chunks < 1 || plan->n_chunks > MAX_CHUNKS || plan->chunk % CHUNK_ALIGN != 0 ||
        plan->desc.n_samples < 1) {
        return APO_FK_ERROR_INVALID_ARGUMENT; /* not made by apo_fk_loss_plan_make */
    }
    return APO_FK_OK;
}

static apo_fk_status launch_residual_sums(const apo_fk_device *device, void *stream, const apo_fk_loss_plan *plan,
                                          const void *model_pred, const void *ref_pred, const void *target,
                                          const void *mask, float *partials) {
    const void *m = mask != NULL ? mask : model_pred;
    const int aligned = sizes_aligned(plan) && apo_fk_aligned16(model_pred) && apo_fk_aligned16(ref_pred) &&
                        apo_fk_aligned16(target) && apo_fk_aligned16(m) && apo_fk_aligned16(partials);
    const int32_t key[4] = {(int32_t)plan->mask_mode, aligned, stream_block(plan, aligned), 0};
    const int index =
        apo_fk_find_variant(APO_FK_KERNEL_RESIDUAL_SUMS, device->arch, (int32_t)plan->desc.dtype, key);
    if (index < 0) return APO_FK_ERROR_INTERNAL;

    CUdeviceptr pred_ptr = apo_fk_devptr(model_pred), ref_ptr = apo_fk_devptr(ref_pred);
    CUdeviceptr target_ptr = apo_fk_devptr(target), mask_ptr = apo_fk_devptr(m);
    CUdeviceptr partial_ptr = apo_fk_devptr(partials);
    int32_t sample_numel = (int32_t)plan->sample_numel, mask_sample_numel = (int32_t)plan->mask_sample_numel;
    int32_t positions = (int32_t)plan->positions, repeats = (int32_t)plan->repeats;
    int32_t repeat_stride = (int32_t)plan->repeat_stride, chunk = (int32_t)plan->chunk;
    int32_t n_chunks = (int32_t)plan->n_chunks;
    float lambda_minus_one = (float)(plan->desc.lambda_mask - 1.0);
    void *slots[APO_FK_NARGS_RESIDUAL_SUMS] = {0};
    APO_FK_ARG(slots, RESIDUAL_SUMS, pred_ptr, pred_ptr);
    APO_FK_ARG(slots, RESIDUAL_SUMS, ref_ptr, ref_ptr);
    APO_FK_ARG(slots, RESIDUAL_SUMS, target_ptr, target_ptr);
    APO_FK_ARG(slots, RESIDUAL_SUMS, mask_ptr, mask_ptr);
    APO_FK_ARG(slots, RESIDUAL_SUMS, partial_ptr, partial_ptr);
    APO_FK_ARG(slots, RESIDUAL_SUMS, sample_numel, sample_numel);
    APO_FK_ARG(slots, RESIDUAL_SUMS, mask_sample_numel, mask_sample_numel);
    APO_FK_ARG(slots, RESIDUAL_SUMS, positions, positions);
    APO_FK_ARG(slots, RESIDUAL_SUMS, repeats, repeats);
    APO_FK_ARG(slots, RESIDUAL_SUMS, repeat_stride, repeat_stride);
    APO_FK_ARG(slots, RESIDUAL_SUMS, chunk, chunk);
    APO_FK_ARG(slots, RESIDUAL_SUMS, n_chunks, n_chunks);
    APO_FK_ARG(slots, RESIDUAL_SUMS, lambda_minus_one, lambda_minus_one);
    return apo_fk_launch(device, index, plan->desc.n_samples, plan->n_chunks, stream, slots);
}

static apo_fk_status launch_finalize(const apo_fk_device *device, void *stream, const apo_fk_loss_plan *plan,
                                     const float *beta_per_term, float *partials, float *stats, float *loss) {
    const int per_term = beta_per_term != NULL;
    int32_t block_chunks = 0;
    for (size_t i = 0; i < sizeof finalize_block_chunks / sizeof finalize_block_chunks[0]; ++i) {
        if (finalize_block_chunks[i] >= plan->n_chunks) {
            block_chunks = finalize_block_chunks[i];
            break;
        }
    }
    if (block_chunks == 0) return APO_FK_ERROR_INTERNAL;
    const int32_t key[4] = {plan->desc.paired, per_term, block_chunks, 0};
    const int index = apo_fk_find_variant(APO_FK_KERNEL_LOSS_FINALIZE, device->arch, APO_FK_DTYPE_FP32, key);
    if (index < 0) return APO_FK_ERROR_INTERNAL;

    CUdeviceptr partial_ptr = apo_fk_devptr(partials);
    CUdeviceptr beta_ptr = per_term ? apo_fk_devptr(beta_per_term) : partial_ptr;
    CUdeviceptr stats_ptr = apo_fk_devptr(stats), loss_ptr = apo_fk_devptr(loss);
    int32_t n_samples = (int32_t)plan->desc.n_samples, n_terms = (int32_t)plan->n_terms;
    int32_t n_chunks = (int32_t)plan->n_chunks;
    float beta_value = per_term ? 0.0f : (float)plan->desc.beta;
    float inv_numel = (float)(1.0 / (double)plan->sample_numel);
    float inv_terms = (float)(1.0 / (double)plan->n_terms);
    float inv_samples = (float)(1.0 / (double)plan->desc.n_samples);
    float lambda_sft = (float)plan->desc.lambda_sft;
    void *slots[APO_FK_NARGS_LOSS_FINALIZE] = {0};
    APO_FK_ARG(slots, LOSS_FINALIZE, partial_ptr, partial_ptr);
    APO_FK_ARG(slots, LOSS_FINALIZE, beta_ptr, beta_ptr);
    APO_FK_ARG(slots, LOSS_FINALIZE, stats_ptr, stats_ptr);
    APO_FK_ARG(slots, LOSS_FINALIZE, loss_ptr, loss_ptr);
    APO_FK_ARG(slots, LOSS_FINALIZE, n_samples, n_samples);
    APO_FK_ARG(slots, LOSS_FINALIZE, n_terms, n_terms);
    APO_FK_ARG(slots, LOSS_FINALIZE, n_chunks, n_chunks);
    APO_FK_ARG(slots, LOSS_FINALIZE, beta_value, beta_value);
    APO_FK_ARG(slots, LOSS_FINALIZE, inv_numel, inv_numel);
    APO_FK_ARG(slots, LOSS_FINALIZE, inv_terms, inv_terms);
    APO_FK_ARG(slots, LOSS_FINALIZE, inv_samples, inv_samples);
    APO_FK_ARG(slots, LOSS_FINALIZE, lambda_sft, lambda_sft);
    return apo_fk_launch(device, index, 1, 1, stream, slots);
}

apo_fk_status apo_fk_loss_forward(void *stream, const apo_fk_loss_plan *plan, const void *model_pred,
                                  const void *ref_pred, const void *target, const void *mask,
                                  const float *beta_per_term, float *partials, float *stats, float *loss) {
    apo_fk_status status = check_plan(plan);
    if (status != APO_FK_OK) return status;
    if (model_pred == NULL || ref_pred == NULL || target == NULL || partials == NULL || stats == NULL ||
        loss == NULL) {
        return APO_FK_ERROR_INVALID_ARGUMENT;
    }
    if (plan->mask_mode != MASK_NONE && mask == NULL) return APO_FK_ERROR_INVALID_ARGUMENT;
    apo_fk_device device;
    status = apo_fk_kernel_device(&device);
    if (status != APO_FK_OK) return status;
    status = launch_residual_sums(&device, stream, plan, model_pred, ref_pred, target,
                                  plan->mask_mode != MASK_NONE ? mask : NULL, partials);
    if (status != APO_FK_OK) return status;
    return launch_finalize(&device, stream, plan, beta_per_term, partials, stats, loss);
}

apo_fk_status apo_fk_loss_grad(void *stream, const apo_fk_loss_plan *plan, const void *model_pred,
                               const void *target, const void *mask, const float *stats, const float *grad_scale,
                               void *grad) {
    apo_fk_status status = check_plan(plan);
    if (status != APO_FK_OK) return status;
    if (model_pred == NULL || target == NULL || stats == NULL || grad == NULL) return APO_FK_ERROR_INVALID_ARGUMENT;
    if (plan->mask_mode != MASK_NONE && mask == NULL) return APO_FK_ERROR_INVALID_ARGUMENT;
    apo_fk_device device;
    status = apo_fk_kernel_device(&device);
    if (status != APO_FK_OK) return status;

    const void *m = plan->mask_mode != MASK_NONE ? mask : model_pred;
    const float *coef = stats + 2 * plan->desc.n_samples;
    const int has_scale = grad_scale != NULL;
    const float *scale = has_scale ? grad_scale : coef;
    const int aligned = sizes_aligned(plan) && apo_fk_aligned16(model_pred) && apo_fk_aligned16(target) &&
                        apo_fk_aligned16(m) && apo_fk_aligned16(coef) && apo_fk_aligned16(scale) &&
                        apo_fk_aligned16(grad);
    const int32_t key[4] = {(int32_t)plan->mask_mode, has_scale, aligned, stream_block(plan, aligned)};
    const int index = apo_fk_find_variant(APO_FK_KERNEL_LOSS_GRAD, device.arch, (int32_t)plan->desc.dtype, key);
    if (index < 0) return APO_FK_ERROR_INTERNAL;

    CUdeviceptr pred_ptr = apo_fk_devptr(model_pred), target_ptr = apo_fk_devptr(target);
    CUdeviceptr mask_ptr = apo_fk_devptr(m), coef_ptr = apo_fk_devptr(coef);
    CUdeviceptr scale_ptr = apo_fk_devptr(scale), grad_ptr = apo_fk_devptr(grad);
    int32_t sample_numel = (int32_t)plan->sample_numel, mask_sample_numel = (int32_t)plan->mask_sample_numel;
    int32_t positions = (int32_t)plan->positions, repeats = (int32_t)plan->repeats;
    int32_t repeat_stride = (int32_t)plan->repeat_stride, chunk = (int32_t)plan->chunk;
    float lambda_minus_one = (float)(plan->desc.lambda_mask - 1.0);
    void *slots[APO_FK_NARGS_LOSS_GRAD] = {0};
    APO_FK_ARG(slots, LOSS_GRAD, pred_ptr, pred_ptr);
    APO_FK_ARG(slots, LOSS_GRAD, target_ptr, target_ptr);
    APO_FK_ARG(slots, LOSS_GRAD, mask_ptr, mask_ptr);
    APO_FK_ARG(slots, LOSS_GRAD, coef_ptr, coef_ptr);
    APO_FK_ARG(slots, LOSS_GRAD, scale_ptr, scale_ptr);
    APO_FK_ARG(slots, LOSS_GRAD, grad_ptr, grad_ptr);
    APO_FK_ARG(slots, LOSS_GRAD, sample_numel, sample_numel);
    APO_FK_ARG(slots, LOSS_GRAD, mask_sample_numel, mask_sample_numel);
    APO_FK_ARG(slots, LOSS_GRAD, positions, positions);
    APO_FK_ARG(slots, LOSS_GRAD, repeats, repeats);
    APO_FK_ARG(slots, LOSS_GRAD, repeat_stride, repeat_stride);
    APO_FK_ARG(slots, LOSS_GRAD, chunk, chunk);
    APO_FK_ARG(slots, LOSS_GRAD, lambda_minus_one, lambda_minus_one);
    return apo_fk_launch(&device, index, plan->desc.n_samples, plan->n_chunks, stream, slots);
}
