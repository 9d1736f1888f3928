/* A fake CUDA driver (libcuda stand-in) for testing the launchers on machines
 * without a GPU. Load it through APO_FAST_KERNELS_LIBCUDA=<path of this library>.
 *
 * It reads each cubin the way the driver does, enough to check a launch:
 *  - cuModuleLoadData: the image must be a 64-bit ELF; its SM version is
 *    read from e_flags;
 *  - cuModuleGetFunction: the kernel must have a .nv.info.<name> section; its
 *    EIATTR_KPARAM_INFO entries give every parameter's offset and size, and
 *    EIATTR_REQNTID the block size the kernel was compiled for;
 *  - cuLaunchKernel: fails like the driver on a wrong block size or on more
 *    dynamic shared memory than allowed; otherwise packs the parameter values
 *    (kernelParams[i] read with parameter i's size) into a buffer laid out
 *    as the kernel's constant bank, and records the launch.
 * Nothing is executed. The device (compute capability, SM count) and the
 * current context are set by the test (fake_cuda_configure). */
#include <elf.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fake_cuda.h"

#define EXPORT __attribute__((visibility("default")))

typedef int CUresult;
enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_NO_BINARY_FOR_GPU = 209,
    CUDA_ERROR_NOT_FOUND = 500
};

#define EIFMT_SVAL 4
#define EIATTR_KPARAM_INFO 0x17
#define EIATTR_REQNTID 0x10
#define MAX_LAUNCHES 256

typedef struct fake_module {
    const unsigned char *image;
    int arch;
} fake_module;

typedef struct fake_function {
    fake_module *module;
    char name[FAKE_CUDA_NAME_MAX];
    int n_params;
    unsigned offsets[FAKE_CUDA_MAX_PARAMS], sizes[FAKE_CUDA_MAX_PARAMS];
    unsigned reqntid[3];
    int max_dynamic_shared;
} fake_function;

static fake_cuda_launch launches[MAX_LAUNCHES];
static int n_launches;
static int n_modules_loaded, n_modules_unloaded;
static int device_cc_major = 9, device_cc_minor = 0, device_sm_count = 132, device_shared_optin = 232448;
static uintptr_t current_context = 1;

/* ------------------------------------------------------------ test controls */
EXPORT void fake_cuda_configure(int cc_major, int cc_minor, int sm_count, int shared_optin, int context_id) {
    device_cc_major = cc_major;
    device_cc_minor = cc_minor;
    device_sm_count = sm_count;
    device_shared_optin = shared_optin;
    current_context = (uintptr_t)context_id;
}

EXPORT void fake_cuda_reset_launches(void) { n_launches = 0; }
EXPORT int fake_cuda_launch_count(void) { return n_launches; }
EXPORT int fake_cuda_modules_loaded(void) { return n_modules_loaded - n_modules_unloaded; }

EXPORT int fake_cuda_launch_get(int index, fake_cuda_launch *out) {
    if (index < 0 || index >= n_launches || out == NULL) return -1;
    *out = launches[index];
    return 0;
}

/* ------------------------------------------------------------ ELF reading */
static int image_arch(const unsigned char *image) {
    const Elf64_Ehdr *eh = (const Elf64_Ehdr *)image;
    if (memcmp(eh->e_ident, ELFMAG, SELFMAG) != 0 || eh->e_ident[EI_CLASS] != ELFCLASS64) return -1;
    /* Two CUDA ELF ABIs: OSABI 0x41 keeps the SM in bits 8..15 of e_flags, the older 0x33 in bits 0..7. */
    return eh->e_ident[EI_OSABI] == 0x41 ? (int)((eh->e_flags >> 8) & 0xff) : (int)(eh->e_flags & 0xff);
}

static const Elf64_Shdr *find_section(const unsigned char *image, const char *name) {
    const Elf64_Ehdr *eh = (const Elf64_Ehdr *)image;
    const Elf64_Shdr *sections = (const Elf64_Shdr *)(image + eh->e_shoff);
    const char *names = (const char *)(image + sections[eh->e_shstrndx].sh_offset);
    for (int i = 0; i < eh->e_shnum; ++i) {
        if (strcmp(names + sections[i].sh_name, name) == 0) return &sections[i];
    }
    return NULL;
}

/* Parameters and required block size from .nv.info.<name>; -1 if the kernel is not there. */
static int read_kernel_info(const unsigned char *image, fake_function *f) {
    char section_name[FAKE_CUDA_NAME_MAX + 16];
    snprintf(section_name, sizeof section_name, ".text.%s", f->name);
    if (find_section(image, section_name) == NULL) return -1;
    snprintf(section_name, sizeof section_name, ".nv.info.%s", f->name);
    const Elf64_Shdr *info = find_section(image, section_name);
    if (info == NULL) return -1;
    const unsigned char *p = image + info->sh_offset, *end = p + info->sh_size;
    f->n_params = 0;
    while (p + 4 <= end) {
        const unsigned format = p[0], attribute = p[1];
        unsigned payload_size = 2;
        const unsigned char *payload = p + 2;
        if (format == EIFMT_SVAL) {
            payload_size = (unsigned)p[2] | ((unsigned)p[3] << 8);
            payload = p + 4;
        }
        if (attribute == EIATTR_KPARAM_INFO && payload_size >= 12) {
            uint16_t ordinal, offset;
            uint32_t flags;
            memcpy(&ordinal, payload + 4, 2);
            memcpy(&offset, payload + 6, 2);
            memcpy(&flags, payload + 8, 4);
            if (ordinal >= FAKE_CUDA_MAX_PARAMS) return -1;
            f->offsets[ordinal] = offset;
            f->sizes[ordinal] = (flags >> 18) & 0x3fff;
            if (ordinal + 1 > f->n_params) f->n_params = ordinal + 1;
        } else if (attribute == EIATTR_REQNTID && payload_size >= 12) {
            memcpy(f->reqntid, payload, 12);
        }
        p = payload + (format == EIFMT_SVAL ? payload_size : 2);
    }
    return 0;
}

/* ------------------------------------------------------------ driver API */
EXPORT CUresult cuInit(unsigned int flags) {
    (void)flags;
    const char *forced = getenv("FAKE_CUDA_INIT_RESULT");
    return forced != NULL ? atoi(forced) : CUDA_SUCCESS;
}

EXPORT CUresult cuDriverGetVersion(int *version) {
    *version = 13000;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetCurrent(void **ctx) {
    *ctx = (void *)current_context;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCtxGetDevice(int *device) {
    if (current_context == 0) return CUDA_ERROR_INVALID_CONTEXT;
    *device = 0;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuDeviceGetAttribute(int *value, int attribute, int device) {
    (void)device;
    switch (attribute) {
    case 16: *value = device_sm_count; return CUDA_SUCCESS;
    case 75: *value = device_cc_major; return CUDA_SUCCESS;
    case 76: *value = device_cc_minor; return CUDA_SUCCESS;
    case 97: *value = device_shared_optin; return CUDA_SUCCESS;
    default: return CUDA_ERROR_INVALID_VALUE;
    }
}

EXPORT CUresult cuModuleLoadData(void **module, const void *image) {
    if (current_context == 0) return CUDA_ERROR_INVALID_CONTEXT;
    const int arch = image_arch((const unsigned char *)image);
    if (arch < 0) return CUDA_ERROR_INVALID_IMAGE;
    /* The driver only runs a cubin on its own major version, at the same or a newer minor;
     * an arch-specific sm_90a cubin on 9.0 only. */
    const int device = 10 * device_cc_major + device_cc_minor;
    if (arch / 10 != device_cc_major || arch > device) return CUDA_ERROR_NO_BINARY_FOR_GPU;
    fake_module *m = calloc(1, sizeof *m);
    m->image = (const unsigned char *)image;
    m->arch = arch;
    *module = m;
    ++n_modules_loaded;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleUnload(void *module) {
    free(module);
    ++n_modules_unloaded;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuModuleGetFunction(void **function, void *module, const char *name) {
    fake_module *m = module;
    if (strlen(name) >= FAKE_CUDA_NAME_MAX) return CUDA_ERROR_NOT_FOUND;
    fake_function *f = calloc(1, sizeof *f);
    f->module = m;
    strcpy(f->name, name);
    f->max_dynamic_shared = 48 * 1024;
    if (read_kernel_info(m->image, f) != 0) {
        free(f);
        return CUDA_ERROR_NOT_FOUND;
    }
    *function = f; /* leaked with the module: a test process is short */
    return CUDA_SUCCESS;
}

EXPORT CUresult cuFuncSetAttribute(void *function, int attribute, int value) {
    fake_function *f = function;
    if (attribute != 8 || value > device_shared_optin) return CUDA_ERROR_INVALID_VALUE;
    f->max_dynamic_shared = value;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuLaunchKernel(void *function, unsigned grid_x, unsigned grid_y, unsigned grid_z, unsigned block_x,
                               unsigned block_y, unsigned block_z, unsigned shared_bytes, void *stream,
                               void **params, void **extra) {
    fake_function *f = function;
    if (current_context == 0) return CUDA_ERROR_INVALID_CONTEXT;
    if (extra != NULL || params == NULL || n_launches == MAX_LAUNCHES) return CUDA_ERROR_INVALID_VALUE;
    if (grid_x == 0 || grid_y == 0 || grid_z == 0 || grid_y > 65535 || grid_z > 65535) return CUDA_ERROR_INVALID_VALUE;
    if (f->reqntid[0] && (block_x != f->reqntid[0] || block_y != f->reqntid[1] || block_z != f->reqntid[2])) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    if ((int)shared_bytes > f->max_dynamic_shared) return CUDA_ERROR_INVALID_VALUE;
    fake_cuda_launch *l = &launches[n_launches];
    memset(l, 0, sizeof *l);
    strcpy(l->function, f->name);
    l->arch = f->module->arch;
    l->image = f->module->image;
    l->grid[0] = grid_x, l->grid[1] = grid_y, l->grid[2] = grid_z;
    l->block[0] = block_x, l->block[1] = block_y, l->block[2] = block_z;
    l->shared_bytes = shared_bytes;
    l->stream = stream;
    l->context = (void *)current_context;
    l->n_params = f->n_params;
    for (int i = 0; i < f->n_params; ++i) {
        if (params[i] == NULL || f->offsets[i] + f->sizes[i] > FAKE_CUDA_PARAM_BYTES) return CUDA_ERROR_INVALID_VALUE;
        l->offsets[i] = f->offsets[i];
        l->sizes[i] = f->sizes[i];
        memcpy(l->params + f->offsets[i], params[i], f->sizes[i]);
    }
    ++n_launches;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuGetErrorString(CUresult error, const char **text) {
    (void)error;
    *text = "fake CUDA error";
    return CUDA_SUCCESS;
}
