/* Variant lookup, the per-context module cache and the launch helper. */
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "apo_fk_internal.h"

/* One entry per CUDA context the library launched in: the device's properties
 * and, per variant, the module and function loaded into that context. */
typedef struct context_entry {
    CUcontext context;
    apo_fk_device device;
    CUmodule *modules;
    CUfunction *functions;
} context_entry;

static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;
static context_entry *entries;
static int n_entries, entries_capacity;

static const char *const kernel_entries[APO_FK_KERNEL_COUNT] = {
    "apo_residual_sums_kernel",      "apo_loss_finalize_kernel",      "apo_grad_kernel",
    "gated_lora_forward_kernel",     "lowrank_project_kernel",        "gated_lora_backward_dx_kernel",
    "gated_lora_backward_dadb_kernel",
};

int apo_fk_find_variant(int kernel, int arch, int dtype, const int32_t key[4]) {
    for (int i = 0; i < apo_fk_variant_table_size; ++i) {
        const apo_fk_variant *v = &apo_fk_variant_table[i];
        if (v->kernel == kernel && v->arch == arch && v->dtype == dtype && v->key[0] == key[0] &&
            v->key[1] == key[1] && v->key[2] == key[2] && v->key[3] == key[3]) {
            return i;
        }
    }
    return -1;
}

static int arch_of(int major, int minor) {
    if (major == 8) return 80;             /* sm_80 cubins run on every 8.x device */
    if (major == 9 && minor == 0) return 90; /* sm_90a: Hopper only */
    return 0;
}

/* Caller holds cache_lock. */
static context_entry *find_entry(CUcontext context) {
    for (int i = 0; i < n_entries; ++i) {
        if (entries[i].context == context) return &entries[i];
    }
    return NULL;
}

/* Caller holds cache_lock. */
static apo_fk_status add_entry(const apo_fk_driver *cu, CUcontext context, context_entry **out) {
    CUdevice dev;
    CUresult r = cu->cuCtxGetDevice(&dev);
    if (r != APO_CUDA_SUCCESS) return apo_fk_cuda_failed(r);
    apo_fk_device d;
    memset(&d, 0, sizeof d);
    d.context = context;
    const struct {
        int attribute;
        int *value;
    } queries[] = {
        {APO_CUDA_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, &d.cc_major},
        {APO_CUDA_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, &d.cc_minor},
        {APO_CUDA_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, &d.sm_count},
        {APO_CUDA_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN, &d.shared_optin},
    };
    for (size_t i = 0; i < sizeof queries / sizeof queries[0]; ++i) {
        r = cu->cuDeviceGetAttribute(queries[i].value, queries[i].attribute, dev);
        if (r != APO_CUDA_SUCCESS) return apo_fk_cuda_failed(r);
    }
    d.arch = arch_of(d.cc_major, d.cc_minor);
    if (n_entries == entries_capacity) {
        int capacity = entries_capacity ? 2 * entries_capacity : 4;
        context_entry *grown = realloc(entries, (size_t)capacity * sizeof *grown);
        if (grown == NULL) return APO_FK_ERROR_INTERNAL;
        entries = grown;
        entries_capacity = capacity;
    }
    context_entry *e = &entries[n_entries];
    e->context = context;
    e->device = d;
    e->modules = calloc((size_t)apo_fk_variant_table_size, sizeof *e->modules);
    e->functions = calloc((size_t)apo_fk_variant_table_size, sizeof *e->functions);
    if (e->modules == NULL || e->functions == NULL) {
        free(e->modules);
        free(e->functions);
        return APO_FK_ERROR_INTERNAL;
    }
    ++n_entries;
    *out = e;
    return APO_FK_OK;
}

apo_fk_status apo_fk_current_device(apo_fk_device *device) {
    apo_fk_status status;
    const apo_fk_driver *cu = apo_fk_driver_get(&status);
    if (cu == NULL) return status;
    CUcontext context = NULL;
    CUresult r = cu->cuCtxGetCurrent(&context);
    if (r != APO_CUDA_SUCCESS) return apo_fk_cuda_failed(r);
    if (context == NULL) return APO_FK_ERROR_NO_CONTEXT;
    pthread_mutex_lock(&cache_lock);
    context_entry *e = find_entry(context);
    status = APO_FK_OK;
    if (e == NULL) status = add_entry(cu, context, &e);
    if (status == APO_FK_OK) *device = e->device;
    pthread_mutex_unlock(&cache_lock);
    return status;
}

apo_fk_status apo_fk_device_query(int *compute_capability, int *cubin_arch, int *sm_count) {
    apo_fk_device device;
    apo_fk_status status = apo_fk_current_device(&device);
    if (status != APO_FK_OK) return status;
    if (compute_capability != NULL) *compute_capability = 10 * device.cc_major + device.cc_minor;
    if (cubin_arch != NULL) *cubin_arch = device.arch;
    if (sm_count != NULL) *sm_count = device.sm_count;
    return APO_FK_OK;
}

/* The function of variant `index` in the device's context, loading its module once. */
static apo_fk_status get_function(const apo_fk_driver *cu, const apo_fk_device *device, int index,
                                  CUfunction *function) {
    const apo_fk_variant *v = &apo_fk_variant_table[index];
    apo_fk_status status = APO_FK_OK;
    pthread_mutex_lock(&cache_lock);
    context_entry *e = find_entry(device->context);
    if (e == NULL) {
        /* released since apo_fk_current_device(): register it again */
        status = add_entry(cu, device->context, &e);
    }
    if (status == APO_FK_OK && e->functions[index] == NULL) {
        CUmodule module = NULL;
        CUfunction f = NULL;
        CUresult r = cu->cuModuleLoadData(&module, v->cubin);
        if (r == APO_CUDA_SUCCESS) r = cu->cuModuleGetFunction(&f, module, v->entry);
        if (r == APO_CUDA_SUCCESS && v->shared_bytes > APO_CUDA_DEFAULT_SHARED_BYTES) {
            r = cu->cuFuncSetAttribute(f, APO_CUDA_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                       (int)v->shared_bytes);
        }
        if (r != APO_CUDA_SUCCESS) {
            if (module != NULL) cu->cuModuleUnload(module);
            status = apo_fk_cuda_failed(r);
        } else {
            e->modules[index] = module;
            e->functions[index] = f;
        }
    }
    if (status == APO_FK_OK) *function = e->functions[index];
    pthread_mutex_unlock(&cache_lock);
    return status;
}

apo_fk_status apo_fk_launch(const apo_fk_device *device, int index, int64_t grid_x, int64_t grid_y, void *stream,
                            void *const *slots) {
    if (index < 0 || index >= apo_fk_variant_table_size) return APO_FK_ERROR_INTERNAL;
    const apo_fk_variant *v = &apo_fk_variant_table[index];
    if (v->arch != device->arch) return APO_FK_ERROR_INTERNAL;
    if ((int64_t)v->shared_bytes > (int64_t)device->shared_optin) return APO_FK_ERROR_NO_KERNEL_FOR_ARCH;
    if (grid_x > APO_FK_INT32_MAX || grid_y > 65535) return APO_FK_ERROR_UNSUPPORTED_SHAPE;
    if (v->n_params + v->n_scratch > APO_FK_MAX_ARGS) return APO_FK_ERROR_INTERNAL;
    void *args[APO_FK_MAX_ARGS];
    CUdeviceptr null_scratch = 0;
    for (int i = 0; i < v->n_params; ++i) {
        void *value = slots[v->params[i]];
        if (value == NULL) return APO_FK_ERROR_INTERNAL; /* an argument the launcher does not know */
        args[i] = value;
    }
    for (int i = 0; i < v->n_scratch; ++i) args[v->n_params + i] = &null_scratch;
    if (grid_x <= 0 || grid_y <= 0) return APO_FK_OK;
    apo_fk_status status;
    const apo_fk_driver *cu = apo_fk_driver_get(&status);
    if (cu == NULL) return status;
    CUfunction f;
    status = get_function(cu, device, index, &f);
    if (status != APO_FK_OK) return status;
    CUresult r = cu->cuLaunchKernel(f, (unsigned)grid_x, (unsigned)grid_y, 1, (unsigned)(32 * v->num_warps), 1, 1,
                                    v->shared_bytes, (CUstream)stream, args, NULL);
    return r == APO_CUDA_SUCCESS ? APO_FK_OK : apo_fk_cuda_failed(r);
}

apo_fk_status apo_fk_release_context(void *cu_context) {
    if (cu_context == NULL) return APO_FK_ERROR_INVALID_ARGUMENT;
    apo_fk_status status;
    const apo_fk_driver *cu = apo_fk_driver_get(&status);
    if (cu == NULL) return status;
    pthread_mutex_lock(&cache_lock);
    context_entry *e = find_entry((CUcontext)cu_context);
    CUresult first_error = APO_CUDA_SUCCESS;
    if (e != NULL) {
        for (int i = 0; i < apo_fk_variant_table_size; ++i) {
            if (e->modules[i] == NULL) continue;
            CUresult r = cu->cuModuleUnload(e->modules[i]);
            if (r != APO_CUDA_SUCCESS && first_error == APO_CUDA_SUCCESS) first_error = r;
        }
        free(e->modules);
        free(e->functions);
        *e = entries[--n_entries];
    }
    pthread_mutex_unlock(&cache_lock);
    return first_error == APO_CUDA_SUCCESS ? APO_FK_OK : apo_fk_cuda_failed(first_error);
}

/* ------------------------------------------------------------ introspection */
int apo_fk_variant_count(void) { return apo_fk_variant_table_size; }

apo_fk_status apo_fk_variant_get(int index, apo_fk_variant_info *info) {
    if (info == NULL || index < 0 || index >= apo_fk_variant_table_size) return APO_FK_ERROR_INVALID_ARGUMENT;
    const apo_fk_variant *v = &apo_fk_variant_table[index];
    if (v->kernel < 0 || v->kernel >= APO_FK_KERNEL_COUNT) return APO_FK_ERROR_INTERNAL;
    info->label = v->label;
    info->kernel = v->entry;
    info->arch = v->arch;
    info->dtype = (apo_fk_dtype)v->dtype;
    info->cubin = v->cubin;
    info->cubin_size = v->cubin_size;
    info->shared_bytes = v->shared_bytes;
    info->num_warps = v->num_warps;
    info->num_params = v->n_params + v->n_scratch;
    /* The table and the launchers agree on which Triton kernel each id is. */
    return strcmp(v->entry, kernel_entries[v->kernel]) == 0 ? APO_FK_OK : APO_FK_ERROR_INTERNAL;
}

const char *apo_fk_status_string(apo_fk_status status) {
    switch (status) {
    case APO_FK_OK: return "APO_FK_OK: success";
    case APO_FK_ERROR_INVALID_ARGUMENT: return "APO_FK_ERROR_INVALID_ARGUMENT: an argument is NULL or out of range";
    case APO_FK_ERROR_UNSUPPORTED_DTYPE: return "APO_FK_ERROR_UNSUPPORTED_DTYPE: no kernel compiled for this dtype";
    case APO_FK_ERROR_UNSUPPORTED_SHAPE:
        return "APO_FK_ERROR_UNSUPPORTED_SHAPE: shape, stride or alignment outside the compiled variants";
    case APO_FK_ERROR_NO_KERNEL_FOR_ARCH:
        return "APO_FK_ERROR_NO_KERNEL_FOR_ARCH: no cubin for this GPU (sm_80 for 8.x, sm_90 for 9.0)";
    case APO_FK_ERROR_NO_DRIVER: return "APO_FK_ERROR_NO_DRIVER: the CUDA driver (libcuda.so.1) could not be loaded";
    case APO_FK_ERROR_NO_DEVICE: return "APO_FK_ERROR_NO_DEVICE: the CUDA driver reports no device";
    case APO_FK_ERROR_NO_CONTEXT: return "APO_FK_ERROR_NO_CONTEXT: no current CUDA context on this thread";
    case APO_FK_ERROR_CUDA: return "APO_FK_ERROR_CUDA: a CUDA driver call failed (apo_fk_last_cuda_error())";
    case APO_FK_ERROR_INTERNAL: return "APO_FK_ERROR_INTERNAL: library tables and launchers disagree";
    }
    return "unknown apo_fk_status";
}
