/* apo_fast_kernels: the fused APO loss and time-gated LoRA kernels of apo-fast,
 * compiled ahead of time by Triton for sm_80 (A100; runs on every 8.x GPU)
 * and sm_90 (H100/H200), with C launch functions on the CUDA driver API.
 *
 * No Python at run time and no CUDA toolkit to build or link: the library
 * opens the driver (libcuda.so.1, or the path in the environment variable
 * APO_FAST_KERNELS_LIBCUDA) at first use.
 *
 * Conventions of every launch function:
 *  - It launches on `stream` (a CUstream / cudaStream_t; NULL = the legacy
 *    default stream) in the calling thread's current CUDA context (with the
 *    CUDA runtime or libtorch, the device's primary context). It does not
 *    synchronise; results are ready when the stream's work is.
 *  - Device pointers are plain addresses (`tensor.data_ptr()`,
 *    cudaMalloc, cuMemAlloc). Sizes and strides count elements.
 *  - Arguments are checked before anything is launched; on an error nothing
 *    runs. APO_FK_ERROR_CUDA means a driver call failed: its CUresult is
 *    apo_fk_last_cuda_error() on the same thread.
 *  - The cubin for the device's compute capability is loaded into the current
 *    context at the first launch of each kernel variant (thread-safe). Call
 *    apo_fk_release_context() before destroying a context the library used.
 *
 * See docs/c_api.md for the build, the numerics and a worked example. */
#ifndef APO_FAST_KERNELS_H
#define APO_FAST_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define APO_FK_API __attribute__((visibility("default")))
#else
#define APO_FK_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define APO_FK_VERSION_MAJOR 0
#define APO_FK_VERSION_MINOR 1
#define APO_FK_VERSION_PATCH 0

/* ------------------------------------------------------------------ status */
typedef enum apo_fk_status {
    APO_FK_OK = 0,
    APO_FK_ERROR_INVALID_ARGUMENT = 1,  /* NULL where a pointer is required, negative size, ... */
    APO_FK_ERROR_UNSUPPORTED_DTYPE = 2, /* a dtype this kernel was not compiled for */
    APO_FK_ERROR_UNSUPPORTED_SHAPE = 3, /* a shape, stride or alignment outside the compiled variants */
    APO_FK_ERROR_NO_KERNEL_FOR_ARCH = 4,/* the device is neither 8.x nor 9.0, or lacks the shared memory */
    APO_FK_ERROR_NO_DRIVER = 5,         /* the CUDA driver library could not be loaded */
    APO_FK_ERROR_NO_DEVICE = 6,         /* the driver is there but reports no CUDA device */
    APO_FK_ERROR_NO_CONTEXT = 7,        /* no current CUDA context on the calling thread */
    APO_FK_ERROR_CUDA = 8,              /* a driver call failed: see apo_fk_last_cuda_error() */
    APO_FK_ERROR_INTERNAL = 9           /* a library bug (the generated tables disagree with the code) */
} apo_fk_status;

typedef enum apo_fk_dtype {
    APO_FK_DTYPE_FP32 = 0,
    APO_FK_DTYPE_FP16 = 1,
    APO_FK_DTYPE_BF16 = 2
} apo_fk_dtype;

/* A short static description of `status` ("APO_FK_ERROR_NO_DRIVER: ..."). */
APO_FK_API const char *apo_fk_status_string(apo_fk_status status);

/* The CUresult of the last failed driver call on this thread (0 if none). */
APO_FK_API int apo_fk_last_cuda_error(void);

/* Load and initialise the driver (once per process): APO_FK_OK,
 * APO_FK_ERROR_NO_DRIVER, APO_FK_ERROR_NO_DEVICE or APO_FK_ERROR_CUDA. */
APO_FK_API apo_fk_status apo_fk_driver_status(void);

/* The device of the calling thread's current context: compute capability as
 * 10 * major + minor (e.g. 90), the cubins it runs (80, 90, or 0: none) and its
 * multiprocessor count. Any output pointer may be NULL. */
APO_FK_API apo_fk_status apo_fk_device_query(int *compute_capability, int *cubin_arch, int *sm_count);

/* Unload the modules this library loaded into `cu_context` (a CUcontext).
 * Call it before cuCtxDestroy on a context the library launched in. */
APO_FK_API apo_fk_status apo_fk_release_context(void *cu_context);

/* ----------------------------------------------------------- introspection */
typedef struct apo_fk_variant_info {
    const char *label;         /* e.g. "residual_sums[bf16,mask_mode=1,aligned=1,block=512,sm_90]" */
    const char *kernel;        /* Triton kernel (the cubin's entry), e.g. "apo_residual_sums_kernel" */
    int arch;                  /* 80 or 90 */
    apo_fk_dtype dtype;        /* storage dtype (FP32 for the finalize kernel) */
    const void *cubin;         /* the embedded cubin (an ELF image) */
    size_t cubin_size;         /* its size in bytes */
    unsigned int shared_bytes; /* dynamic shared memory per program */
    int num_warps;             /* threads per program / 32 */
    int num_params;            /* parameters of the compiled kernel, scratch pointers included */
} apo_fk_variant_info;

APO_FK_API int apo_fk_variant_count(void);
/* Describe variant `index` (0 <= index < apo_fk_variant_count()). */
APO_FK_API apo_fk_status apo_fk_variant_get(int index, apo_fk_variant_info *info);

/* ================================================================ APO loss
 * The fused APO / Diffusion-DPO loss of apo_fast.loss.apo_loss (Triton path):
 *
 *   e_i = mean over sample i of w * (p - t)^2,  r_i likewise with the reference,
 *   w = 1 + (lambda_mask - 1) * mask,
 *   unpaired: L = mean_i softplus(beta_i (e_i - r_i)) + lambda_sft * mean_i e_i,
 *   paired (samples j and j + B/2 are a winner/loser pair):
 *             L = mean_j softplus(beta_j ((e_w - r_w) - (e_l - r_l))) + lambda_sft * mean_j e_w,
 *
 * with dL/dp written as grad = coef_i * w * (p - t) by a second pass.
 * Three launches as in apo_fast/ops/apo_loss.py: residual sums (grid
 * (B, n_chunks)), finalize (one program), gradient (grid (B, n_chunks)). */

typedef enum apo_fk_layout {
    APO_FK_LAYOUT_CONTIGUOUS = 0,   /* (B, C, *spatial) row-major (NCHW) */
    APO_FK_LAYOUT_CHANNELS_LAST = 1 /* (B, *spatial, C) in memory (channels_last) */
} apo_fk_layout;

typedef struct apo_fk_loss_desc {
    apo_fk_dtype dtype;    /* of model_pred, ref_pred, target, the mask and the gradient */
    apo_fk_layout layout;  /* memory order of model_pred, ref_pred, target and grad */
    int64_t n_samples;     /* B (even when paired) */
    int64_t channels;      /* C */
    int64_t spatial;       /* product of the spatial dims (H * W) */
    int64_t mask_channels; /* 0: no mask; 1: (B, 1, spatial) contiguous, broadcast over channels
                              (with CHANNELS_LAST data only for C == 4); C: full mask, same layout as the data */
    double lambda_mask;    /* >= 0; the mask is not read when it is 1 */
    double lambda_sft;     /* >= 0 */
    double beta;           /* beta_t for every term unless a per-term beta vector is passed */
    int paired;            /* 0: unpaired; 1: winners are samples [0, B/2), losers [B/2, B) */
} apo_fk_loss_desc;

/* How the kernels walk the data (mirrors StreamPlan in apo_fast/ops/apo_loss.py). */
typedef struct apo_fk_loss_plan {
    apo_fk_loss_desc desc;
    int64_t n_terms;          /* B, or B / 2 when paired */
    int64_t sample_numel;     /* C * spatial */
    int64_t positions, repeats, repeat_stride;
    int64_t mask_mode;        /* 0 none, 1 direct, 2 channels_last broadcast */
    int64_t mask_div, mask_sample_numel;
    int64_t chunk, n_chunks;  /* grid of the streaming kernels: (B, n_chunks) */
    int64_t partials_floats;  /* workspace: B * n_chunks * 2 floats */
    int64_t stats_floats;     /* stats: e_theta[B], e_ref[B], coef[B], metrics[8] */
} apo_fk_loss_plan;

#define APO_FK_LOSS_NUM_METRICS 8 /* loss, e_theta, e_ref, reward_w, reward_l, implicit_acc, beta_t, sft */

/* Plan a loss call. `sm_count` > 0 is the device's multiprocessor count (the
 * Python path aims at 8 programs per SM); 0 asks the current device (needs
 * the driver and a context). Errors: INVALID_ARGUMENT (sizes < 1, odd B when
 * paired, mask_channels not 0/1/C, negative lambdas), UNSUPPORTED_DTYPE,
 * UNSUPPORTED_SHAPE (C * spatial >= 2^31 - 2^20; a broadcast mask on
 * channels_last data with C != 4). */
APO_FK_API apo_fk_status apo_fk_loss_plan_make(const apo_fk_loss_desc *desc, int sm_count, apo_fk_loss_plan *plan);

/* Loss, per-sample errors, metrics and gradient coefficients.
 *   model_pred, ref_pred, target: B * C * spatial elements of desc->dtype (layout desc->layout);
 *   mask: as desc->mask_channels says, desc->dtype; NULL iff mask_channels == 0
 *         (it may be NULL when lambda_mask == 1);
 *   beta_per_term: NULL (use desc->beta) or n_terms float32 on the device;
 *   partials: plan->partials_floats float32 workspace;
 *   stats: plan->stats_floats float32 (e_theta[B], e_ref[B], coef[B], metrics[8]);
 *   loss: one float32. */
APO_FK_API apo_fk_status apo_fk_loss_forward(void *stream, const apo_fk_loss_plan *plan, const void *model_pred,
                                             const void *ref_pred, const void *target, const void *mask,
                                             const float *beta_per_term, float *partials, float *stats,
                                             float *loss);

/* grad = coef_i * w * (p - t) [* *grad_scale], in desc->dtype and layout.
 *   stats: as written by apo_fk_loss_forward (coef = stats + 2B is read);
 *   grad_scale: NULL, or one float32 on the device multiplied in (the incoming
 *               gradient dL_total/dL: the fp16 path folds the loss scale in here);
 *   grad: B * C * spatial elements (may not alias the inputs). */
APO_FK_API apo_fk_status apo_fk_loss_grad(void *stream, const apo_fk_loss_plan *plan, const void *model_pred,
                                          const void *target, const void *mask, const float *stats,
                                          const float *grad_scale, void *grad);

/* ========================================================== gated LoRA
 * The time-gated LoRA linear of apo_fast.ops.gated_lora (frozen base layer):
 *
 *   y = x W^T + b + scaling * ((x A^T) * gate[row / tokens_per_sample]) B^T
 *
 * x (M, K), W (N, K), b (N), A (rank, K), B (N, rank), gate (G, rank) float32,
 * y (M, N). FP16 and BF16 storage, fp32 accumulation, ranks 1..64 (padded to
 * 16 or 64). Inner dimensions are contiguous; row strides (`ld_*`) are passed.
 * Compiled for aligned operands: every pointer 16-byte aligned, K, N and the
 * ld_x / ld_weight / ld_lora_a / ld_y strides multiples of 16; anything else
 * is APO_FK_ERROR_UNSUPPORTED_SHAPE (use the Python path or pad). */
typedef struct apo_fk_gated_lora_desc {
    apo_fk_dtype dtype;        /* x, weight, bias, lora_a, lora_b, y, h, dy, dx: FP16 or BF16 */
    int64_t tokens;            /* M */
    int64_t in_features;       /* K */
    int64_t out_features;      /* N */
    int64_t rank;              /* r, 1..64 */
    int64_t tokens_per_sample; /* consecutive rows sharing one gate row (M when one gate row) */
    int64_t gate_row_stride;   /* floats between gate rows; 0: one gate row for every token */
    double scaling;            /* peft's lora_alpha / r */
    int64_t ld_x;              /* row stride of x and dx (0: in_features) */
    int64_t ld_weight;         /* row stride of W (0: in_features) */
    int64_t ld_lora_a;         /* row stride of A (0: in_features) */
    int64_t ld_lora_b;         /* row stride of B (0: rank) */
    int64_t ld_y;              /* row stride of y and dy (0: out_features) */
} apo_fk_gated_lora_desc;

/* y and h = x A^T (M, rank, dense, desc->dtype; the backward reads it).
 * bias: NULL or N elements. gate: float32 rows (required; a (1, r) row of
 * ones with gate_row_stride 0 is a plain LoRA). For rank > 16 h is computed
 * first by a skinny product and read back (two launches), as in Python. */
APO_FK_API apo_fk_status apo_fk_gated_lora_forward(void *stream, const apo_fk_gated_lora_desc *desc, const void *x,
                                                   const void *weight, const void *bias, const void *lora_a,
                                                   const void *lora_b, const float *gate, void *y, void *h);

/* dx = dy W + (u * s * g) A and u = dy B (M, rank, dense float32, written;
 * apo_fk_gated_lora_backward_dadb and the gate gradient need it). dy is
 * (M, N) with row stride ld_y, dx (M, K) with row stride ld_x. */
APO_FK_API apo_fk_status apo_fk_gated_lora_backward_dx(void *stream, const apo_fk_gated_lora_desc *desc,
                                                       const void *dy, const void *weight, const void *lora_a,
                                                       const void *lora_b, const float *gate, void *dx, float *u);

/* Token splits of the dA/dB reduction, as the Python launcher picks them
 * (about two programs per SM; `sm_count` 0 asks the current device). */
APO_FK_API apo_fk_status apo_fk_gated_lora_dadb_splits(const apo_fk_gated_lora_desc *desc, int sm_count,
                                                       int *splits, int *tokens_per_split);

/* Split-token partial sums, float32, dense:
 *   da_partials (splits, rank, K):  sum over the split's tokens of (u s g)^T x,
 *   dbt_partials (splits, rank, N): sum over the split's tokens of (h s g)^T dy.
 * dA = sum over splits of da_partials; dB = (sum over splits of dbt_partials)^T.
 * The gate gradient is scaling * sum over each gate row's tokens of u * h. */
APO_FK_API apo_fk_status apo_fk_gated_lora_backward_dadb(void *stream, const apo_fk_gated_lora_desc *desc,
                                                         int splits, int tokens_per_split, const void *x,
                                                         const void *h, const void *dy, const float *u,
                                                         const float *gate, float *da_partials,
                                                         float *dbt_partials);

#ifdef __cplusplus
}
#endif

#endif /* APO_FAST_KERNELS_H */
