/* Internal declarations of libapo_fast_kernels: the variant table written by
 * apo_fast/kernels_aot.py, the CUDA driver entry points loaded at run time,
 * and the per-context module cache. Not installed. */
#ifndef APO_FK_INTERNAL_H
#define APO_FK_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "apo_fast_kernels.h"

/* ---------------------------------------------------------------- CUDA driver
 * The few driver types and entry points the library uses, declared here so
 * that building needs no CUDA toolkit; libcuda.so.1 is opened with dlopen at
 * first use. Values as in cuda.h (CUDA 12/13). */
typedef int CUresult;
typedef int CUdevice;
typedef struct CUctx_st *CUcontext;
typedef struct CUmod_st *CUmodule;
typedef struct CUfunc_st *CUfunction;
typedef struct CUstream_st *CUstream;
typedef unsigned long long CUdeviceptr;

enum {
    APO_CUDA_SUCCESS = 0,
    APO_CUDA_ERROR_INVALID_VALUE = 1,
    APO_CUDA_ERROR_NOT_INITIALIZED = 3,
    APO_CUDA_ERROR_NO_DEVICE = 100,
    APO_CUDA_ERROR_INVALID_CONTEXT = 201,
    APO_CUDA_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16,
    APO_CUDA_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75,
    APO_CUDA_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR = 76,
    APO_CUDA_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN = 97,
    APO_CUDA_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8,
    APO_CUDA_DEFAULT_SHARED_BYTES = 49152 /* without opting in */
};

typedef struct apo_fk_driver {
    CUresult (*cuInit)(unsigned int flags);
    CUresult (*cuDriverGetVersion)(int *version);
    CUresult (*cuCtxGetCurrent)(CUcontext *ctx);
    CUresult (*cuCtxGetDevice)(CUdevice *device);
    CUresult (*cuDeviceGetAttribute)(int *value, int attribute, CUdevice device);
    CUresult (*cuModuleLoadData)(CUmodule *module, const void *image);
    CUresult (*cuModuleUnload)(CUmodule module);
    CUresult (*cuModuleGetFunction)(CUfunction *function, CUmodule module, const char *name);
    CUresult (*cuFuncSetAttribute)(CUfunction function, int attribute, int value);
    CUresult (*cuLaunchKernel)(CUfunction function, unsigned int grid_x, unsigned int grid_y, unsigned int grid_z,
                               unsigned int block_x, unsigned int block_y, unsigned int block_z,
                               unsigned int shared_bytes, CUstream stream, void **params, void **extra);
    CUresult (*cuGetErrorString)(CUresult error, const char **text);
} apo_fk_driver;

/* The loaded driver (NULL with *status set when it cannot be loaded/initialised). */
const apo_fk_driver *apo_fk_driver_get(apo_fk_status *status);

/* Record a failed driver call for apo_fk_last_cuda_error(); returns APO_FK_ERROR_CUDA. */
apo_fk_status apo_fk_cuda_failed(CUresult result);

/* ---------------------------------------------------------------- variants */
typedef enum apo_fk_kernel_id {
    APO_FK_KERNEL_RESIDUAL_SUMS = 0,
    APO_FK_KERNEL_LOSS_FINALIZE = 1,
    APO_FK_KERNEL_LOSS_GRAD = 2,
    APO_FK_KERNEL_GL_FORWARD = 3,
    APO_FK_KERNEL_GL_PROJECT = 4,
    APO_FK_KERNEL_GL_BACKWARD_DX = 5,
    APO_FK_KERNEL_GL_BACKWARD_DADB = 6,
    APO_FK_KERNEL_COUNT = 7
} apo_fk_kernel_id;

/* Kinds of kernel arguments (generated APO_FK_KIND_<KERNEL>_<arg> macros). */
#define APO_FK_KIND_CONSTEXPR 0
#define APO_FK_KIND_PTR 1
#define APO_FK_KIND_I32 2
#define APO_FK_KIND_F32 3

#define APO_FK_MAX_ARGS 48

#if defined(__GNUC__)
#define APO_FK_CUBIN_ALIGN __attribute__((aligned(64)))
#else
#define APO_FK_CUBIN_ALIGN
#endif

/* One compiled kernel variant (a row of the generated table).
 * key: the kernel's selection key (apo_fast/kernels_aot.py KEY_FIELDS), zero-padded.
 * params: for each runtime parameter of the compiled kernel, in order, the
 * index of its Python argument (its argument slot); n_scratch null pointers follow. */
typedef struct apo_fk_variant {
    int32_t kernel;
    int32_t arch;
    int32_t dtype;
    int32_t key[4];
    const char *label;
    const char *entry;
    const unsigned char *cubin;
    uint32_t cubin_size;
    uint32_t shared_bytes;
    int32_t num_warps;
    int32_t n_params;
    int32_t n_scratch;
    const unsigned char *params;
    int32_t tiles[4]; /* BLOCK_M, BLOCK_N, BLOCK_K, BLOCK_C constexprs (0: none), for grids */
} apo_fk_variant;

enum { APO_FK_TILE_M = 0, APO_FK_TILE_N = 1, APO_FK_TILE_K = 2, APO_FK_TILE_C = 3 };

extern const apo_fk_variant apo_fk_variant_table[];
extern const int apo_fk_variant_table_size;

/* Index of the variant (kernel, arch, dtype, key[0..3]), or -1. */
int apo_fk_find_variant(int kernel, int arch, int dtype, const int32_t key[4]);

/* ---------------------------------------------------------------- devices */
/* The device of the calling thread's current context, as the launchers need it. */
typedef struct apo_fk_device {
    CUcontext context;
    int arch; /* 80 or 90: the cubins this device runs; 0: none */
    int cc_major, cc_minor;
    int sm_count;
    int shared_optin;
} apo_fk_device;

/* Load the driver and describe the current context's device (cached per context). */
apo_fk_status apo_fk_current_device(apo_fk_device *device);

/* apo_fk_current_device(), and APO_FK_ERROR_NO_KERNEL_FOR_ARCH for a device without cubins. */
static inline apo_fk_status apo_fk_kernel_device(apo_fk_device *device) {
    apo_fk_status status = apo_fk_current_device(device);
    if (status != APO_FK_OK) return status;
    return device->arch == 0 ? APO_FK_ERROR_NO_KERNEL_FOR_ARCH : APO_FK_OK;
}

/* Launch variant `index` on `device`: grid (gx, gy, 1), num_warps * 32 threads,
 * its dynamic shared memory; `slots` holds a pointer to each argument's value,
 * indexed by the kernel's argument slots (unset slots must be NULL). Loads the
 * module into the device's context on first use. A grid with no programs is a no-op. */
apo_fk_status apo_fk_launch(const apo_fk_device *device, int index, int64_t grid_x, int64_t grid_y, void *stream,
                            void *const *slots);

/* Store a pointer to `var` in `slots` at argument `name` of `KERNEL`, checking at
 * compile time that the variable's C type matches the kernel argument's kind
 * (device pointers as CUdeviceptr, integers as int32_t, floats as float). */
#define APO_FK_ARG(slots, KERNEL, name, var)                                                                  \
    do {                                                                                                      \
        _Static_assert(APO_FK_KIND_##KERNEL##_##name ==                                                       \
                           _Generic((var), CUdeviceptr: APO_FK_KIND_PTR, int32_t: APO_FK_KIND_I32,            \
                                    float: APO_FK_KIND_F32, default: -1),                                     \
                       "argument " #name " of " #KERNEL ": the C type does not match the kernel signature"); \
        (slots)[APO_FK_ARG_##KERNEL##_##name] = (void *)&(var);                                              \
    } while (0)

/* ---------------------------------------------------------------- helpers */
static inline int64_t apo_fk_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int apo_fk_aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }
static inline CUdeviceptr apo_fk_devptr(const void *p) { return (CUdeviceptr)(uintptr_t)p; }
static inline int apo_fk_dtype_valid(int dtype) {
    return dtype == APO_FK_DTYPE_FP32 || dtype == APO_FK_DTYPE_FP16 || dtype == APO_FK_DTYPE_BF16;
}

#define APO_FK_INT32_MAX 2147483647LL

#endif /* APO_FK_INTERNAL_H */
