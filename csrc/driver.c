/* The CUDA driver, opened with dlopen at first use: the library links and
 * loads on machines without a GPU or a CUDA toolkit, and reports
 * APO_FK_ERROR_NO_DRIVER / APO_FK_ERROR_NO_DEVICE there. */
#include <dlfcn.h>
#include <pthread.h>
#include <stdlib.h>

#include "apo_fk_internal.h"

#define APO_FK_DEFAULT_LIBCUDA "libcuda.so.1"

static pthread_once_t driver_once = PTHREAD_ONCE_INIT;
static apo_fk_driver driver;
static apo_fk_status driver_status = APO_FK_ERROR_NO_DRIVER;
static CUresult driver_init_result = APO_CUDA_SUCCESS;
static _Thread_local int last_cuda_error = APO_CUDA_SUCCESS;

static void *symbol(void *handle, const char *name, int *missing) {
    void *p = dlsym(handle, name);
    if (p == NULL) *missing = 1;
    return p;
}

static void load_driver(void) {
    const char *path = getenv("APO_FAST_KERNELS_LIBCUDA");
    if (path == NULL || path[0] == '\0') path = APO_FK_DEFAULT_LIBCUDA;
    void *handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (handle == NULL) return; /* APO_FK_ERROR_NO_DRIVER */
    int missing = 0;
    /* Unversioned names are the entry points cuda.h maps these calls to
     * (without per-thread default-stream compilation). */
    *(void **)&driver.cuInit = symbol(handle, "cuInit", &missing);
    *(void **)&driver.cuDriverGetVersion = symbol(handle, "cuDriverGetVersion", &missing);
    *(void **)&driver.cuCtxGetCurrent = symbol(handle, "cuCtxGetCurrent", &missing);
    *(void **)&driver.cuCtxGetDevice = symbol(handle, "cuCtxGetDevice", &missing);
    *(void **)&driver.cuDeviceGetAttribute = symbol(handle, "cuDeviceGetAttribute", &missing);
    *(void **)&driver.cuModuleLoadData = symbol(handle, "cuModuleLoadData", &missing);
    *(void **)&driver.cuModuleUnload = symbol(handle, "cuModuleUnload", &missing);
    *(void **)&driver.cuModuleGetFunction = symbol(handle, "cuModuleGetFunction", &missing);
    *(void **)&driver.cuFuncSetAttribute = symbol(handle, "cuFuncSetAttribute", &missing);
    *(void **)&driver.cuLaunchKernel = symbol(handle, "cuLaunchKernel", &missing);
    *(void **)&driver.cuGetErrorString = symbol(handle, "cuGetErrorString", &missing);
    if (missing) {
        dlclose(handle);
        return; /* not a usable driver: APO_FK_ERROR_NO_DRIVER */
    }
    driver_init_result = driver.cuInit(0);
    if (driver_init_result == APO_CUDA_SUCCESS) {
        driver_status = APO_FK_OK;
    } else if (driver_init_result == APO_CUDA_ERROR_NO_DEVICE) {
        driver_status = APO_FK_ERROR_NO_DEVICE;
    } else {
        driver_status = APO_FK_ERROR_CUDA;
    }
    /* The handle stays open for the life of the process. */
}

const apo_fk_driver *apo_fk_driver_get(apo_fk_status *status) {
    pthread_once(&driver_once, load_driver);
    if (driver_status != APO_FK_OK) {
        if (driver_status == APO_FK_ERROR_CUDA || driver_status == APO_FK_ERROR_NO_DEVICE) {
            last_cuda_error = driver_init_result;
        }
        *status = driver_status;
        return NULL;
    }
    *status = APO_FK_OK;
    return &driver;
}

apo_fk_status apo_fk_cuda_failed(CUresult result) {
    last_cuda_error = result;
    return APO_FK_ERROR_CUDA;
}

int apo_fk_last_cuda_error(void) { return last_cuda_error; }

apo_fk_status apo_fk_driver_status(void) {
    apo_fk_status status;
    apo_fk_driver_get(&status);
    return status;
}
