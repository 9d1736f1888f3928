// The few CUDA driver calls the example and the GPU test need to own memory
// (primary context, allocation, copies), loaded with dlopen so that they build
// without a CUDA toolkit. A real application would use the CUDA runtime or
// libtorch instead; apo_fast_kernels only needs a current context.
#pragma once

#include <dlfcn.h>

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <stdexcept>
#include <string>

namespace apo_example {

using CUresult = int;
using CUdeviceptr = unsigned long long;

class CudaDriver {
public:
    // Opens libcuda.so.1; loaded() is false where there is no driver.
    CudaDriver() {
        handle_ = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
        if (handle_ == nullptr) return;
        bool ok = bind(cuInit, "cuInit") && bind(cuDeviceGet, "cuDeviceGet") &&
                  bind(cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain") &&
                  bind(cuDevicePrimaryCtxRelease, "cuDevicePrimaryCtxRelease_v2") &&
                  bind(cuCtxSetCurrent, "cuCtxSetCurrent") && bind(cuCtxSynchronize, "cuCtxSynchronize") &&
                  bind(cuMemAlloc, "cuMemAlloc_v2") && bind(cuMemFree, "cuMemFree_v2") &&
                  bind(cuMemcpyHtoD, "cuMemcpyHtoD_v2") && bind(cuMemcpyDtoH, "cuMemcpyDtoH_v2") &&
                  bind(cuGetErrorString, "cuGetErrorString");
        if (!ok) {
            dlclose(handle_);
            handle_ = nullptr;
        }
    }
    CudaDriver(const CudaDriver &) = delete;
    CudaDriver &operator=(const CudaDriver &) = delete;
    ~CudaDriver() {
        if (handle_ != nullptr) dlclose(handle_);
    }

    bool loaded() const { return handle_ != nullptr; }

    // Throws std::runtime_error naming the call when a driver call fails.
    void check(CUresult result, const char *what) const {
        if (result == 0) return;
        const char *text = "unknown error";
        cuGetErrorString(result, &text);
        throw std::runtime_error(std::string(what) + " failed: " + text + " (CUresult " + std::to_string(result) +
                                 ")");
    }

    CUresult (*cuInit)(unsigned int) = nullptr;
    CUresult (*cuDeviceGet)(int *, int) = nullptr;
    CUresult (*cuDevicePrimaryCtxRetain)(void **, int) = nullptr;
    CUresult (*cuDevicePrimaryCtxRelease)(int) = nullptr;
    CUresult (*cuCtxSetCurrent)(void *) = nullptr;
    CUresult (*cuCtxSynchronize)() = nullptr;
    CUresult (*cuMemAlloc)(CUdeviceptr *, size_t) = nullptr;
    CUresult (*cuMemFree)(CUdeviceptr) = nullptr;
    CUresult (*cuMemcpyHtoD)(CUdeviceptr, const void *, size_t) = nullptr;
    CUresult (*cuMemcpyDtoH)(void *, CUdeviceptr, size_t) = nullptr;
    CUresult (*cuGetErrorString)(CUresult, const char **) = nullptr;

private:
    template <typename F>
    bool bind(F &f, const char *name) {
        f = reinterpret_cast<F>(dlsym(handle_, name));
        return f != nullptr;
    }
    void *handle_ = nullptr;
};

// The primary context of device 0, made current for the lifetime of the object.
class PrimaryContext {
public:
    explicit PrimaryContext(const CudaDriver &cu) : cu_(cu) {
        cu_.check(cu_.cuInit(0), "cuInit");
        cu_.check(cu_.cuDeviceGet(&device_, 0), "cuDeviceGet");
        cu_.check(cu_.cuDevicePrimaryCtxRetain(&context_, device_), "cuDevicePrimaryCtxRetain");
        cu_.check(cu_.cuCtxSetCurrent(context_), "cuCtxSetCurrent");
    }
    PrimaryContext(const PrimaryContext &) = delete;
    PrimaryContext &operator=(const PrimaryContext &) = delete;
    ~PrimaryContext() { cu_.cuDevicePrimaryCtxRelease(device_); }
    void *handle() const { return context_; }

private:
    const CudaDriver &cu_;
    int device_ = 0;
    void *context_ = nullptr;
};

// A device allocation of `bytes`, freed on destruction.
class DeviceBuffer {
public:
    DeviceBuffer(const CudaDriver &cu, size_t bytes) : cu_(cu), bytes_(bytes) {
        cu_.check(cu_.cuMemAlloc(&ptr_, bytes > 0 ? bytes : 1), "cuMemAlloc");
    }
    DeviceBuffer(const DeviceBuffer &) = delete;
    DeviceBuffer &operator=(const DeviceBuffer &) = delete;
    ~DeviceBuffer() { cu_.cuMemFree(ptr_); }

    void *get() const { return reinterpret_cast<void *>(static_cast<uintptr_t>(ptr_)); }
    template <typename T>
    T *as() const { return static_cast<T *>(get()); }
    void upload(const void *host, size_t bytes) const { cu_.check(cu_.cuMemcpyHtoD(ptr_, host, bytes), "cuMemcpyHtoD"); }
    void download(void *host, size_t bytes) const { cu_.check(cu_.cuMemcpyDtoH(host, ptr_, bytes), "cuMemcpyDtoH"); }

private:
    const CudaDriver &cu_;
    size_t bytes_;
    CUdeviceptr ptr_ = 0;
};

}  // namespace apo_example
