// CTest tests of libapo_fast_kernels.
//
//   test_c_api no-driver    the driver library is missing (APO_FAST_KERNELS_LIBCUDA points nowhere):
//                           clean APO_FK_ERROR_NO_DRIVER codes, argument checks, embedded cubins
//   test_c_api fake-driver  the fake driver (fake_cuda.c) stands in for libcuda: variant choice per
//                           compute capability, grids, block sizes, parameter lists and values as
//                           the compiled kernels declare them, module cache per context
//   test_c_api no-device    the fake driver's cuInit reports CUDA_ERROR_NO_DEVICE
//   test_c_api gpu          the real driver: kernels on random data against a float64 host reference;
//                           exits 77 (skipped) without a driver or a supported GPU
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "apo_fast_kernels.h"
#include "cuda_driver.hpp"
#include "fake_cuda.h"

namespace {

int failures = 0;

#define CHECK(cond)                                                                 \
    do {                                                                            \
        if (!(cond)) {                                                              \
            std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
            ++failures;                                                             \
        }                                                                           \
    } while (0)

#define CHECK_STATUS(expr, expected)                                                               \
    do {                                                                                           \
        apo_fk_status got_ = (expr);                                                               \
        if (got_ != (expected)) {                                                                  \
            std::fprintf(stderr, "%s:%d: %s returned %s, expected %s\n", __FILE__, __LINE__, #expr, \
                         apo_fk_status_string(got_), apo_fk_status_string(expected));              \
            ++failures;                                                                            \
        }                                                                                          \
    } while (0)

void *fake_ptr(uintptr_t address) { return reinterpret_cast<void *>(address); }

apo_fk_loss_desc sd_loss_desc() {
    apo_fk_loss_desc d{};
    d.dtype = APO_FK_DTYPE_BF16;
    d.layout = APO_FK_LAYOUT_CONTIGUOUS;
    d.n_samples = 4;
    d.channels = 4;
    d.spatial = 64 * 64;
    d.mask_channels = 1;
    d.lambda_mask = 2.0;
    d.lambda_sft = 0.0;
    d.beta = 5.0;
    d.paired = 0;
    return d;
}

apo_fk_gated_lora_desc lora_desc(int64_t rank) {
    apo_fk_gated_lora_desc d{};
    d.dtype = APO_FK_DTYPE_FP16;
    d.tokens = 2 * 77;
    d.in_features = 64;
    d.out_features = 96;
    d.rank = rank;
    d.tokens_per_sample = 77;
    d.gate_row_stride = rank;
    d.scaling = 2.0;
    return d;
}

// ------------------------------------------------------------------ introspection
void check_embedded_cubins() {
    const int n = apo_fk_variant_count();
    CHECK(n > 0);
    std::map<std::string, std::set<int>> archs_of_kernel;
    size_t total = 0;
    for (int i = 0; i < n; ++i) {
        apo_fk_variant_info info;
        CHECK_STATUS(apo_fk_variant_get(i, &info), APO_FK_OK);
        const unsigned char *image = static_cast<const unsigned char *>(info.cubin);
        CHECK(info.cubin_size > 1024);
        CHECK(std::memcmp(image, "\x7f" "ELF", 4) == 0);
        CHECK(image[4] == 2);  // ELFCLASS64
        CHECK(reinterpret_cast<uintptr_t>(info.cubin) % 8 == 0);
        CHECK(info.arch == 80 || info.arch == 90);
        CHECK(info.num_warps >= 1 && info.num_warps <= 8);
        CHECK(info.num_params > 0);
        CHECK(std::strstr(info.label, info.arch == 80 ? "sm_80" : "sm_90") != nullptr);
        archs_of_kernel[info.kernel].insert(info.arch);
        total += info.cubin_size;
    }
    apo_fk_variant_info info;
    CHECK_STATUS(apo_fk_variant_get(n, &info), APO_FK_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(apo_fk_variant_get(0, nullptr), APO_FK_ERROR_INVALID_ARGUMENT);
    const char *kernels[] = {"apo_residual_sums_kernel",      "apo_loss_finalize_kernel", "apo_grad_kernel",
                             "gated_lora_forward_kernel",     "lowrank_project_kernel",
                             "gated_lora_backward_dx_kernel", "gated_lora_backward_dadb_kernel"};
    for (const char *k : kernels) CHECK((archs_of_kernel[k] == std::set<int>{80, 90}));
    std::printf("%d variants, %.2f MB of cubins\n", n, total / 1e6);
}

void check_plan() {
    // The SD shape of the docstring: positions 4096 (mask broadcast over 4 NCHW channels), 132 SMs.
    apo_fk_loss_desc d = sd_loss_desc();
    apo_fk_loss_plan plan;
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 132, &plan), APO_FK_OK);
    CHECK(plan.positions == 4096 && plan.repeats == 4 && plan.repeat_stride == 4096);
    CHECK(plan.mask_mode == 1 && plan.mask_sample_numel == 4096 && plan.sample_numel == 16384);
    CHECK(plan.chunk == 512 && plan.n_chunks == 8);  // min(1024, cdiv(1056, 4), cdiv(4096, 512)) = 8 chunks
    CHECK(plan.partials_floats == 4 * 8 * 2 && plan.stats_floats == 3 * 4 + 8);

    d.lambda_mask = 1.0;  // w == 1: no mask read
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 132, &plan), APO_FK_OK);
    CHECK(plan.mask_mode == 0 && plan.positions == 16384 && plan.repeats == 1);

    d = sd_loss_desc();
    d.layout = APO_FK_LAYOUT_CHANNELS_LAST;
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 132, &plan), APO_FK_OK);
    CHECK(plan.mask_mode == 2 && plan.mask_div == 4 && plan.positions == 16384 && plan.mask_sample_numel == 4096);
    d.channels = 8;
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 132, &plan), APO_FK_ERROR_UNSUPPORTED_SHAPE);

    d = sd_loss_desc();
    d.paired = 1;
    d.n_samples = 5;
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 132, &plan), APO_FK_ERROR_INVALID_ARGUMENT);
    d = sd_loss_desc();
    d.mask_channels = 3;
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 132, &plan), APO_FK_ERROR_INVALID_ARGUMENT);
    d = sd_loss_desc();
    d.dtype = static_cast<apo_fk_dtype>(7);
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 132, &plan), APO_FK_ERROR_UNSUPPORTED_DTYPE);
    d = sd_loss_desc();
    d.spatial = int64_t(1) << 30;
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 132, &plan), APO_FK_ERROR_UNSUPPORTED_SHAPE);
    d = sd_loss_desc();
    d.lambda_mask = -1.0;
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 132, &plan), APO_FK_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(apo_fk_loss_plan_make(nullptr, 132, &plan), APO_FK_ERROR_INVALID_ARGUMENT);

    // Large sample: chunks of several 512-element units, fewer programs per sample.
    d = sd_loss_desc();
    d.n_samples = 64;
    d.spatial = 256 * 256;
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 132, &plan), APO_FK_OK);
    CHECK(plan.chunk == 4096 && plan.n_chunks == 16);  // per_sample = cdiv(1056, 64) = 17
}

void check_lora_splits() {
    apo_fk_gated_lora_desc d = lora_desc(4);
    int splits = 0, per_split = 0;
    CHECK_STATUS(apo_fk_gated_lora_dadb_splits(&d, 2, &splits, &per_split), APO_FK_OK);
    // 4 programs over 1 + 2 column tiles -> 2 splits of 128 tokens (granule 128 at r_pad 16).
    CHECK(splits == 2 && per_split == 128);
    d.in_features = 60;
    CHECK_STATUS(apo_fk_gated_lora_dadb_splits(&d, 2, &splits, &per_split), APO_FK_ERROR_UNSUPPORTED_SHAPE);
    d = lora_desc(80);
    CHECK_STATUS(apo_fk_gated_lora_dadb_splits(&d, 2, &splits, &per_split), APO_FK_ERROR_UNSUPPORTED_SHAPE);
    d = lora_desc(4);
    d.dtype = APO_FK_DTYPE_FP32;
    CHECK_STATUS(apo_fk_gated_lora_dadb_splits(&d, 2, &splits, &per_split), APO_FK_ERROR_UNSUPPORTED_DTYPE);
}

// ------------------------------------------------------------------ no driver
int run_no_driver() {
    CHECK_STATUS(apo_fk_driver_status(), APO_FK_ERROR_NO_DRIVER);
    CHECK(std::strncmp(apo_fk_status_string(APO_FK_ERROR_NO_DRIVER), "APO_FK_ERROR_NO_DRIVER", 22) == 0);
    check_embedded_cubins();
    check_plan();
    check_lora_splits();

    apo_fk_loss_desc d = sd_loss_desc();
    apo_fk_loss_plan plan;
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 0, &plan), APO_FK_ERROR_NO_DRIVER);  // asks the device
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 132, &plan), APO_FK_OK);
    void *a = fake_ptr(0x10000), *b = fake_ptr(0x20000), *c = fake_ptr(0x30000), *m = fake_ptr(0x40000);
    float *w = static_cast<float *>(fake_ptr(0x50000));
    CHECK_STATUS(apo_fk_loss_forward(nullptr, &plan, a, b, c, m, nullptr, w, w, w), APO_FK_ERROR_NO_DRIVER);
    CHECK_STATUS(apo_fk_loss_grad(nullptr, &plan, a, c, m, w, nullptr, b), APO_FK_ERROR_NO_DRIVER);
    // Argument errors come first, without touching the driver.
    CHECK_STATUS(apo_fk_loss_forward(nullptr, &plan, a, b, c, nullptr, nullptr, w, w, w),
                 APO_FK_ERROR_INVALID_ARGUMENT);
    CHECK_STATUS(apo_fk_loss_forward(nullptr, nullptr, a, b, c, m, nullptr, w, w, w), APO_FK_ERROR_INVALID_ARGUMENT);
    apo_fk_gated_lora_desc g = lora_desc(4);
    CHECK_STATUS(apo_fk_gated_lora_forward(nullptr, &g, a, b, nullptr, c, m, w, a, b), APO_FK_ERROR_NO_DRIVER);
    CHECK_STATUS(apo_fk_gated_lora_forward(nullptr, &g, fake_ptr(0x10008), b, nullptr, c, m, w, a, b),
                 APO_FK_ERROR_UNSUPPORTED_SHAPE);  // x not 16-byte aligned
    CHECK_STATUS(apo_fk_gated_lora_backward_dx(nullptr, &g, a, b, c, m, w, a, w), APO_FK_ERROR_NO_DRIVER);
    CHECK_STATUS(apo_fk_release_context(fake_ptr(1)), APO_FK_ERROR_NO_DRIVER);
    CHECK_STATUS(apo_fk_device_query(nullptr, nullptr, nullptr), APO_FK_ERROR_NO_DRIVER);
    return failures == 0 ? 0 : 1;
}

// A driver that loads but reports no device: APO_FK_ERROR_NO_DEVICE with the CUresult kept.
int run_no_device() {
    CHECK_STATUS(apo_fk_driver_status(), APO_FK_ERROR_NO_DEVICE);
    CHECK(apo_fk_last_cuda_error() == 100);  // CUDA_ERROR_NO_DEVICE
    apo_fk_loss_desc d = sd_loss_desc();
    apo_fk_loss_plan plan;
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 0, &plan), APO_FK_ERROR_NO_DEVICE);
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 132, &plan), APO_FK_OK);
    void *a = fake_ptr(0x10000);
    float *w = static_cast<float *>(fake_ptr(0x50000));
    CHECK_STATUS(apo_fk_loss_forward(nullptr, &plan, a, a, a, a, nullptr, w, w, w), APO_FK_ERROR_NO_DEVICE);
    return failures == 0 ? 0 : 1;
}

// ------------------------------------------------------------------ fake driver
struct FakeDriver {
    void *handle = nullptr;
    decltype(&fake_cuda_configure) configure = nullptr;
    decltype(&fake_cuda_reset_launches) reset = nullptr;
    decltype(&fake_cuda_launch_count) count = nullptr;
    decltype(&fake_cuda_launch_get) get = nullptr;
    decltype(&fake_cuda_modules_loaded) modules = nullptr;

    bool open(const char *path) {
        handle = dlopen(path, RTLD_NOW | RTLD_LOCAL);  // the instance libapo_fast_kernels loaded
        if (handle == nullptr) return false;
        configure = reinterpret_cast<decltype(configure)>(dlsym(handle, "fake_cuda_configure"));
        reset = reinterpret_cast<decltype(reset)>(dlsym(handle, "fake_cuda_reset_launches"));
        count = reinterpret_cast<decltype(count)>(dlsym(handle, "fake_cuda_launch_count"));
        get = reinterpret_cast<decltype(get)>(dlsym(handle, "fake_cuda_launch_get"));
        modules = reinterpret_cast<decltype(modules)>(dlsym(handle, "fake_cuda_modules_loaded"));
        return configure && reset && count && get && modules;
    }
    std::vector<fake_cuda_launch> launches() const {
        std::vector<fake_cuda_launch> out(count());
        for (size_t i = 0; i < out.size(); ++i) get((int)i, &out[i]);
        return out;
    }
};

template <typename T>
T param(const fake_cuda_launch &l, int i) {
    T v{};
    if (i < l.n_params && l.sizes[i] == sizeof(T)) std::memcpy(&v, l.params + l.offsets[i], sizeof(T));
    return v;
}

uintptr_t ptr_param(const fake_cuda_launch &l, int i) {
    return i < l.n_params && l.sizes[i] == 8 ? param<uint64_t>(l, i) : ~uintptr_t(0);
}

void check_loss_launches(FakeDriver &fake, int cc_major, int cc_minor, int context) {
    fake.configure(cc_major, cc_minor, 132, 232448, context);
    fake.reset();
    const int arch = cc_major == 9 ? 90 : 80;
    apo_fk_loss_desc d = sd_loss_desc();
    apo_fk_loss_plan plan;
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 0, &plan), APO_FK_OK);  // SM count from the (fake) device
    CHECK(plan.n_chunks == 8);
    const uintptr_t P = 0x100000, R = 0x200000, T = 0x300000, M = 0x400000, W = 0x500000, S = 0x600000;
    const uintptr_t L = 0x700000, G = 0x800000, SCALE = 0x900000;
    void *stream = fake_ptr(0x42);
    CHECK_STATUS(apo_fk_loss_forward(stream, &plan, fake_ptr(P), fake_ptr(R), fake_ptr(T), fake_ptr(M), nullptr,
                                     (float *)fake_ptr(W), (float *)fake_ptr(S), (float *)fake_ptr(L)),
                 APO_FK_OK);
    CHECK_STATUS(apo_fk_loss_grad(stream, &plan, fake_ptr(P), fake_ptr(T), fake_ptr(M), (float *)fake_ptr(S),
                                  (float *)fake_ptr(SCALE), fake_ptr(G)),
                 APO_FK_OK);
    const auto l = fake.launches();
    CHECK(l.size() == 3);
    if (l.size() != 3) return;
    for (const auto &x : l) {
        CHECK(x.arch == arch);
        CHECK(x.stream == stream);
    }
    // Residual sums: (pred, ref, target, mask, partials, sample_numel, mask_sample_numel, positions,
    // repeats, repeat_stride, chunk, n_chunks, lambda_minus_one) + 2 scratch pointers.
    CHECK(std::strcmp(l[0].function, "apo_residual_sums_kernel") == 0);
    CHECK(l[0].grid[0] == 4 && l[0].grid[1] == 8 && l[0].grid[2] == 1);
    CHECK(l[0].block[0] == 64);  // BLOCK 512 with 2 warps (chunk 512)
    CHECK(l[0].n_params == 15);
    CHECK(ptr_param(l[0], 0) == P && ptr_param(l[0], 1) == R && ptr_param(l[0], 2) == T);
    CHECK(ptr_param(l[0], 3) == M && ptr_param(l[0], 4) == W);
    const int32_t sums_ints[] = {16384, 4096, 4096, 4, 4096, 512, 8};
    for (int i = 0; i < 7; ++i) CHECK(param<int32_t>(l[0], 5 + i) == sums_ints[i]);
    CHECK(param<float>(l[0], 12) == 1.0f);
    CHECK(ptr_param(l[0], 13) == 0 && ptr_param(l[0], 14) == 0);
    // Finalize: one program of 8 warps; beta_ptr = partials when beta is a scalar.
    CHECK(std::strcmp(l[1].function, "apo_loss_finalize_kernel") == 0);
    CHECK(l[1].grid[0] == 1 && l[1].grid[1] == 1 && l[1].block[0] == 256);
    CHECK(l[1].n_params == 14);
    CHECK(ptr_param(l[1], 0) == W && ptr_param(l[1], 1) == W && ptr_param(l[1], 2) == S && ptr_param(l[1], 3) == L);
    CHECK(param<int32_t>(l[1], 4) == 4 && param<int32_t>(l[1], 5) == 4 && param<int32_t>(l[1], 6) == 8);
    CHECK(param<float>(l[1], 7) == 5.0f && param<float>(l[1], 8) == (float)(1.0 / 16384));
    CHECK(param<float>(l[1], 9) == 0.25f && param<float>(l[1], 10) == 0.25f && param<float>(l[1], 11) == 0.0f);
    // Gradient: coef = stats + 2B floats; the incoming-gradient scale pointer.
    CHECK(std::strcmp(l[2].function, "apo_grad_kernel") == 0);
    CHECK(l[2].grid[0] == 4 && l[2].grid[1] == 8);
    CHECK(l[2].n_params == 15);
    CHECK(ptr_param(l[2], 0) == P && ptr_param(l[2], 1) == T && ptr_param(l[2], 2) == M);
    CHECK(ptr_param(l[2], 3) == S + 8 * 4 && ptr_param(l[2], 4) == SCALE && ptr_param(l[2], 5) == G);
    const int32_t grad_ints[] = {16384, 4096, 4096, 4, 4096, 512};
    for (int i = 0; i < 6; ++i) CHECK(param<int32_t>(l[2], 6 + i) == grad_ints[i]);
    CHECK(param<float>(l[2], 12) == 1.0f);

    // No mask (lambda_mask == 1): repeats is a compile-time 1, so one parameter fewer;
    // an unaligned pointer selects the generic variant (same parameters).
    d.lambda_mask = 1.0;
    d.n_samples = 64;
    d.spatial = 256 * 256;
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 0, &plan), APO_FK_OK);
    fake.reset();
    CHECK_STATUS(apo_fk_loss_forward(nullptr, &plan, fake_ptr(P), fake_ptr(R), fake_ptr(T), nullptr, nullptr,
                                     (float *)fake_ptr(W), (float *)fake_ptr(S), (float *)fake_ptr(L)),
                 APO_FK_OK);
    CHECK_STATUS(apo_fk_loss_forward(nullptr, &plan, fake_ptr(P + 2), fake_ptr(R), fake_ptr(T), nullptr, nullptr,
                                     (float *)fake_ptr(W), (float *)fake_ptr(S), (float *)fake_ptr(L)),
                 APO_FK_OK);
    const auto l2 = fake.launches();
    CHECK(l2.size() == 4);
    if (l2.size() == 4) {
        CHECK(l2[0].n_params == 14 && l2[2].n_params == 14);
        CHECK(l2[0].grid[0] == 64 && l2[0].grid[1] == (unsigned)plan.n_chunks);
        CHECK(l2[0].block[0] == 256);  // chunk 8192: BLOCK 2048 with 8 warps
        CHECK(l2[2].block[0] == 64);   // generic: BLOCK 512 with 2 warps
        CHECK(l2[0].image != l2[2].image);
        CHECK(ptr_param(l2[2], 0) == P + 2);
        CHECK(param<int32_t>(l2[0], 5) == 262144 && param<int32_t>(l2[0], 8) == 262144);  // repeat_stride
    }
}

void check_lora_launches(FakeDriver &fake, int cc_major, int cc_minor, int context) {
    fake.configure(cc_major, cc_minor, 2, cc_major == 9 ? 232448 : 166912, context);
    const uintptr_t X = 0x1000000, Wt = 0x2000000, BIAS = 0x3000000, A = 0x4000000, B = 0x5000000;
    const uintptr_t GATE = 0x6000000, Y = 0x7000000, H = 0x8000000, U = 0x9000000, DX = 0xa000000;
    const uintptr_t DA = 0xb000000, DB = 0xc000000;
    for (int64_t rank : {4, 40}) {
        fake.reset();
        apo_fk_gated_lora_desc d = lora_desc(rank);
        CHECK_STATUS(apo_fk_gated_lora_forward(nullptr, &d, fake_ptr(X), fake_ptr(Wt), fake_ptr(BIAS), fake_ptr(A),
                                               fake_ptr(B), (float *)fake_ptr(GATE), fake_ptr(Y), fake_ptr(H)),
                     APO_FK_OK);
        CHECK_STATUS(apo_fk_gated_lora_backward_dx(nullptr, &d, fake_ptr(Y), fake_ptr(Wt), fake_ptr(A), fake_ptr(B),
                                                   (float *)fake_ptr(GATE), fake_ptr(DX), (float *)fake_ptr(U)),
                     APO_FK_OK);
        int splits = 0, per_split = 0;
        CHECK_STATUS(apo_fk_gated_lora_dadb_splits(&d, 0, &splits, &per_split), APO_FK_OK);
        CHECK_STATUS(apo_fk_gated_lora_backward_dadb(nullptr, &d, splits, per_split, fake_ptr(X), fake_ptr(H),
                                                     fake_ptr(Y), (float *)fake_ptr(U), (float *)fake_ptr(GATE),
                                                     (float *)fake_ptr(DA), (float *)fake_ptr(DB)),
                     APO_FK_OK);
        const auto l = fake.launches();
        const bool in_loop = rank <= 16;
        std::vector<std::string> expected = {"gated_lora_forward_kernel", "gated_lora_backward_dx_kernel",
                                             "gated_lora_backward_dadb_kernel"};
        if (!in_loop) {  // the skinny products h = x A^T and u = dy B come first
            expected.insert(expected.begin() + 1, "lowrank_project_kernel");
            expected.insert(expected.begin(), "lowrank_project_kernel");
        }
        CHECK(l.size() == expected.size());
        if (l.size() != expected.size()) continue;
        for (size_t i = 0; i < l.size(); ++i) {
            CHECK(expected[i] == l[i].function);
            CHECK(l[i].arch == (cc_major == 9 ? 90 : 80));
            CHECK(l[i].shared_bytes > 0);
        }
        const fake_cuda_launch &fwd = l[in_loop ? 0 : 1];
        // (x, w, bias, a, b, gate, y, h, M, N, K, rank, tokens_per_sample, scaling, 7 strides) + 2 scratch
        CHECK(fwd.n_params == 23);
        const uintptr_t fwd_ptrs[] = {X, Wt, BIAS, A, B, GATE, Y, H};
        for (int i = 0; i < 8; ++i) CHECK(ptr_param(fwd, i) == fwd_ptrs[i]);
        const int32_t fwd_ints[] = {154, 96, 64, (int32_t)rank, 77};
        for (int i = 0; i < 5; ++i) CHECK(param<int32_t>(fwd, 8 + i) == fwd_ints[i]);
        CHECK(param<float>(fwd, 13) == 2.0f);
        const int32_t fwd_strides[] = {64, 64, 64, (int32_t)rank, (int32_t)rank, 96, (int32_t)rank};
        for (int i = 0; i < 7; ++i) CHECK(param<int32_t>(fwd, 14 + i) == fwd_strides[i]);
        CHECK(fwd.grid[0] == 2 && fwd.grid[1] == 1);  // cdiv(154, 128) * cdiv(96, 128)
        const fake_cuda_launch &dadb = l.back();
        CHECK((int)dadb.grid[1] == splits);
        if (!in_loop) {
            // u = dy B: F = B^T with rank stride 1 and column stride rank, fp32 output.
            const fake_cuda_launch &proj_u = l[2];
            CHECK(ptr_param(proj_u, 0) == Y && ptr_param(proj_u, 1) == B && ptr_param(proj_u, 2) == U);
            CHECK(param<int32_t>(proj_u, 3) == 154 && param<int32_t>(proj_u, 4) == 96);
            CHECK(param<int32_t>(proj_u, 7) == 1 && param<int32_t>(proj_u, 8) == (int32_t)rank);
            CHECK(l[0].image != proj_u.image);  // bf16/fp16 out vs fp32 out variants
        }
    }
}

int run_fake_driver(const char *fake_path) {
    FakeDriver fake;
    if (!fake.open(fake_path)) {
        std::fprintf(stderr, "cannot open the fake driver %s: %s\n", fake_path, dlerror());
        return 1;
    }
    CHECK_STATUS(apo_fk_driver_status(), APO_FK_OK);
    check_embedded_cubins();

    apo_fk_loss_desc d = sd_loss_desc();
    apo_fk_loss_plan plan;
    CHECK_STATUS(apo_fk_loss_plan_make(&d, 132, &plan), APO_FK_OK);
    void *a = fake_ptr(0x10000);
    float *w = static_cast<float *>(fake_ptr(0x50000));

    fake.configure(9, 0, 132, 232448, 0);  // no current context
    CHECK_STATUS(apo_fk_loss_forward(nullptr, &plan, a, a, a, a, nullptr, w, w, w), APO_FK_ERROR_NO_CONTEXT);
    fake.configure(7, 5, 40, 65536, 7);  // Turing: no cubin
    CHECK_STATUS(apo_fk_loss_forward(nullptr, &plan, a, a, a, a, nullptr, w, w, w), APO_FK_ERROR_NO_KERNEL_FOR_ARCH);
    fake.configure(10, 0, 148, 232448, 8);  // Blackwell: the sm_90a cubins do not run there
    CHECK_STATUS(apo_fk_loss_forward(nullptr, &plan, a, a, a, a, nullptr, w, w, w), APO_FK_ERROR_NO_KERNEL_FOR_ARCH);

    int cc = 0, arch = -1, sms = 0;
    CHECK_STATUS(apo_fk_device_query(&cc, &arch, &sms), APO_FK_OK);
    CHECK(cc == 100 && arch == 0 && sms == 148);
    fake.configure(8, 6, 84, 101376, 9);
    CHECK_STATUS(apo_fk_device_query(&cc, &arch, nullptr), APO_FK_OK);
    CHECK(cc == 86 && arch == 80);

    check_loss_launches(fake, 9, 0, 1);  // H100/H200: sm_90 cubins
    check_loss_launches(fake, 8, 6, 2);  // RTX 30xx: the sm_80 cubins
    check_lora_launches(fake, 9, 0, 1);
    check_lora_launches(fake, 8, 0, 3);
    // A device without the opt-in shared memory of a gated-LoRA variant.
    fake.configure(8, 9, 2, 65536, 4);
    apo_fk_gated_lora_desc g = lora_desc(4);
    CHECK_STATUS(apo_fk_gated_lora_forward(nullptr, &g, a, a, nullptr, a, a, w, a, a), APO_FK_ERROR_NO_KERNEL_FOR_ARCH);

    CHECK(fake.modules() > 0);
    for (int ctx : {1, 2, 3, 4, 7, 8, 9}) CHECK_STATUS(apo_fk_release_context(fake_ptr(ctx)), APO_FK_OK);
    CHECK(fake.modules() == 0);
    // After a release the context is registered again on its next launch.
    fake.configure(9, 0, 132, 232448, 1);
    fake.reset();
    CHECK_STATUS(apo_fk_loss_forward(nullptr, &plan, a, a, a, a, nullptr, w, w, w), APO_FK_OK);
    CHECK(fake.count() == 2);
    CHECK_STATUS(apo_fk_release_context(fake_ptr(1)), APO_FK_OK);
    CHECK(fake.modules() == 0);
    return failures == 0 ? 0 : 1;
}

// ------------------------------------------------------------------ GPU
uint16_t to_half(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000;
    int32_t exponent = (int32_t)((x >> 23) & 0xff) - 127 + 15;
    uint32_t mantissa = x & 0x7fffff;
    if (exponent >= 31) return (uint16_t)(sign | 0x7c00);
    if (exponent <= 0) {  // subnormal or zero
        if (exponent < -10) return (uint16_t)sign;
        mantissa |= 0x800000;
        const uint32_t shift = (uint32_t)(14 - exponent);
        uint32_t half = mantissa >> shift;
        const uint32_t rest = mantissa & ((1u << shift) - 1), halfway = 1u << (shift - 1);
        if (rest > halfway || (rest == halfway && (half & 1))) ++half;
        return (uint16_t)(sign | half);
    }
    uint32_t half = sign | ((uint32_t)exponent << 10) | (mantissa >> 13);
    const uint32_t rest = mantissa & 0x1fff;
    if (rest > 0x1000 || (rest == 0x1000 && (half & 1))) ++half;
    return (uint16_t)half;
}

float from_half(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    const int exponent = (h >> 10) & 0x1f;
    const uint32_t mantissa = h & 0x3ff;
    float value;
    if (exponent == 0) value = std::ldexp((float)mantissa, -24);
    else if (exponent == 31) value = mantissa ? NAN : INFINITY;
    else value = std::ldexp((float)(mantissa | 0x400), exponent - 25);
    uint32_t bits;
    std::memcpy(&bits, &value, 4);
    bits |= sign;
    std::memcpy(&value, &bits, 4);
    return value;
}

uint16_t to_bf16(float f) {
    uint32_t x;
    std::memcpy(&x, &f, 4);
    x += 0x7fff + ((x >> 16) & 1);
    return (uint16_t)(x >> 16);
}

float from_bf16(uint16_t h) {
    const uint32_t x = (uint32_t)h << 16;
    float f;
    std::memcpy(&f, &x, 4);
    return f;
}

// Host values in a storage dtype: `values` are rounded to it, `bytes` hold its encoding.
struct Stored {
    std::vector<float> values;
    std::vector<unsigned char> bytes;
};

size_t dtype_size(apo_fk_dtype t) { return t == APO_FK_DTYPE_FP32 ? 4 : 2; }

Stored store(const std::vector<float> &v, apo_fk_dtype t) {
    Stored s;
    s.values.resize(v.size());
    s.bytes.resize(v.size() * dtype_size(t));
    for (size_t i = 0; i < v.size(); ++i) {
        if (t == APO_FK_DTYPE_FP32) {
            s.values[i] = v[i];
            std::memcpy(&s.bytes[4 * i], &v[i], 4);
        } else {
            const uint16_t h = t == APO_FK_DTYPE_FP16 ? to_half(v[i]) : to_bf16(v[i]);
            s.values[i] = t == APO_FK_DTYPE_FP16 ? from_half(h) : from_bf16(h);
            std::memcpy(&s.bytes[2 * i], &h, 2);
        }
    }
    return s;
}

std::vector<float> load(const std::vector<unsigned char> &bytes, apo_fk_dtype t) {
    const size_t n = bytes.size() / dtype_size(t);
    std::vector<float> out(n);
    for (size_t i = 0; i < n; ++i) {
        if (t == APO_FK_DTYPE_FP32) {
            std::memcpy(&out[i], &bytes[4 * i], 4);
        } else {
            uint16_t h;
            std::memcpy(&h, &bytes[2 * i], 2);
            out[i] = t == APO_FK_DTYPE_FP16 ? from_half(h) : from_bf16(h);
        }
    }
    return out;
}

double storage_tolerance(apo_fk_dtype t) {
    return t == APO_FK_DTYPE_FP32 ? 1e-5 : t == APO_FK_DTYPE_FP16 ? 2e-3 : 1.6e-2;
}

// max |a - b| / max |b|, the comparison every GPU check uses.
double relative_error(const std::vector<float> &got, const std::vector<double> &want) {
    double err = 0.0, scale = 1e-30;
    for (size_t i = 0; i < want.size(); ++i) {
        err = std::fmax(err, std::fabs(got[i] - want[i]));
        scale = std::fmax(scale, std::fabs(want[i]));
    }
    return err / scale;
}

struct LossCase {
    const char *name;
    apo_fk_loss_desc desc;
    bool beta_vector;
    bool with_scale;
};

bool run_loss_case(const apo_example::CudaDriver &cu, const LossCase &c, std::mt19937 &rng) {
    const apo_fk_loss_desc &d = c.desc;
    apo_fk_loss_plan plan;
    if (apo_fk_loss_plan_make(&d, 0, &plan) != APO_FK_OK) return false;
    const int64_t B = d.n_samples, C = d.channels, S = d.spatial, N = C * S;
    const size_t numel = (size_t)(B * N);
    std::normal_distribution<float> normal;
    std::bernoulli_distribution anomaly(0.25);
    std::vector<float> p(numel), r(numel), t(numel);
    for (size_t i = 0; i < numel; ++i) {
        t[i] = normal(rng);
        p[i] = t[i] + 0.7f * normal(rng);
        r[i] = t[i] + 0.7f * normal(rng);
    }
    const size_t mask_numel = d.mask_channels == 0 ? 0 : (size_t)(B * d.mask_channels * S);
    std::vector<float> m(mask_numel);
    for (float &v : m) v = anomaly(rng) ? 1.0f : 0.0f;
    const Stored sp = store(p, d.dtype), sr = store(r, d.dtype), st = store(t, d.dtype), sm = store(m, d.dtype);
    const int64_t T = plan.n_terms;
    std::vector<float> beta(T);
    for (int64_t j = 0; j < T; ++j) beta[j] = c.beta_vector ? 2.0f + (float)j : (float)d.beta;
    const float scale_value = 3.0f;

    // Host reference (float64) from the stored values.
    const bool masked = d.mask_channels != 0 && d.lambda_mask != 1.0;
    auto index = [&](int64_t b, int64_t ch, int64_t s) {
        return d.layout == APO_FK_LAYOUT_CONTIGUOUS ? (size_t)(b * N + ch * S + s) : (size_t)(b * N + s * C + ch);
    };
    auto weight = [&](int64_t b, int64_t ch, int64_t s) {
        if (!masked) return 1.0;
        const size_t mi = d.mask_channels == 1 ? (size_t)(b * S + s) : index(b, ch, s);
        return 1.0 + (d.lambda_mask - 1.0) * sm.values[mi];
    };
    std::vector<double> e(B), er(B);
    for (int64_t b = 0; b < B; ++b) {
        for (int64_t ch = 0; ch < C; ++ch) {
            for (int64_t s = 0; s < S; ++s) {
                const size_t i = index(b, ch, s);
                const double w = weight(b, ch, s), dp = (double)sp.values[i] - st.values[i];
                const double dr = (double)sr.values[i] - st.values[i];
                e[b] += w * dp * dp;
                er[b] += w * dr * dr;
            }
        }
        e[b] /= N;
        er[b] /= N;
    }
    std::vector<double> coef(B), metrics(8, 0.0);
    double loss = 0.0, sft = 0.0;
    for (int64_t j = 0; j < T; ++j) {
        const double bj = beta[j];
        const double delta_w = e[j] - er[j];
        double z = bj * delta_w;
        const double reward_w = -bj * delta_w;
        double wins = delta_w < 0 ? 1.0 : delta_w == 0 ? 0.5 : 0.0;
        if (d.paired) {
            const double reward_l = -bj * (e[j + T] - er[j + T]);
            z = reward_l - reward_w;
            wins = reward_w > reward_l ? 1.0 : reward_w == reward_l ? 0.5 : 0.0;
            metrics[4] += reward_l / T;
        }
        const double sig = 1.0 / (1.0 + std::exp(-z));
        loss += (std::fmax(z, 0.0) + std::log1p(std::exp(-std::fabs(z)))) / T;
        sft += e[j] / T;
        coef[j] = (sig / T * bj + d.lambda_sft / T) * 2.0 / N;
        if (d.paired) coef[j + T] = -sig / T * bj * 2.0 / N;
        metrics[3] += reward_w / T;
        metrics[5] += wins / T;
        metrics[6] += bj / T;
    }
    loss += d.lambda_sft * sft;
    metrics[0] = loss;
    for (int64_t b = 0; b < B; ++b) {
        metrics[1] += e[b] / B;
        metrics[2] += er[b] / B;
    }
    metrics[7] = d.lambda_sft > 0 ? sft : 0.0;
    std::vector<double> grad(numel);
    for (int64_t b = 0; b < B; ++b)
        for (int64_t ch = 0; ch < C; ++ch)
            for (int64_t s = 0; s < S; ++s) {
                const size_t i = index(b, ch, s);
                grad[i] = coef[b] * weight(b, ch, s) * ((double)sp.values[i] - st.values[i]) *
                          (c.with_scale ? scale_value : 1.0);
            }

    // Device run. Outputs are poisoned with NaN first.
    const size_t es = dtype_size(d.dtype);
    apo_example::DeviceBuffer dp(cu, numel * es), dr(cu, numel * es), dt(cu, numel * es);
    apo_example::DeviceBuffer dm(cu, mask_numel * es), dg(cu, numel * es), dbeta(cu, (size_t)T * 4);
    apo_example::DeviceBuffer dpart(cu, (size_t)plan.partials_floats * 4), dstats(cu, (size_t)plan.stats_floats * 4);
    apo_example::DeviceBuffer dloss(cu, 4), dscale(cu, 4);
    dp.upload(sp.bytes.data(), sp.bytes.size());
    dr.upload(sr.bytes.data(), sr.bytes.size());
    dt.upload(st.bytes.data(), st.bytes.size());
    if (mask_numel) dm.upload(sm.bytes.data(), sm.bytes.size());
    dbeta.upload(beta.data(), beta.size() * 4);
    dscale.upload(&scale_value, 4);
    std::vector<unsigned char> nan_bytes(numel * es, 0xff);
    dg.upload(nan_bytes.data(), nan_bytes.size());
    std::vector<float> nan_stats((size_t)plan.stats_floats, NAN);
    dstats.upload(nan_stats.data(), nan_stats.size() * 4);

    apo_fk_status status = apo_fk_loss_forward(nullptr, &plan, dp.get(), dr.get(), dt.get(),
                                               mask_numel ? dm.get() : nullptr,
                                               c.beta_vector ? dbeta.as<float>() : nullptr, dpart.as<float>(),
                                               dstats.as<float>(), dloss.as<float>());
    if (status == APO_FK_OK) {
        status = apo_fk_loss_grad(nullptr, &plan, dp.get(), dt.get(), mask_numel ? dm.get() : nullptr,
                                  dstats.as<float>(), c.with_scale ? dscale.as<float>() : nullptr, dg.get());
    }
    if (status != APO_FK_OK) {
        std::fprintf(stderr, "%s: %s\n", c.name, apo_fk_status_string(status));
        return false;
    }
    cu.check(cu.cuCtxSynchronize(), "cuCtxSynchronize");
    float got_loss;
    std::vector<float> stats((size_t)plan.stats_floats);
    std::vector<unsigned char> grad_bytes(numel * es);
    dloss.download(&got_loss, 4);
    dstats.download(stats.data(), stats.size() * 4);
    dg.download(grad_bytes.data(), grad_bytes.size());

    const std::vector<float> got_e(stats.begin(), stats.begin() + B), got_er(stats.begin() + B, stats.begin() + 2 * B);
    const std::vector<float> got_coef(stats.begin() + 2 * B, stats.begin() + 3 * B);
    const std::vector<float> got_metrics(stats.begin() + 3 * B, stats.end());
    const double err_loss = std::fabs(got_loss - loss) / std::fmax(1.0, std::fabs(loss));
    const double err_e = std::fmax(relative_error(got_e, e), relative_error(got_er, er));
    const double err_coef = relative_error(got_coef, coef);
    const double err_metrics = relative_error(got_metrics, metrics);
    const double err_grad = relative_error(load(grad_bytes, d.dtype), grad);
    const bool ok = err_loss < 1e-4 && err_e < 1e-5 && err_coef < 1e-4 && err_metrics < 1e-4 &&
                    err_grad < storage_tolerance(d.dtype) + 1e-4;
    std::printf("%-28s loss %.6f vs %.6f | rel err: loss %.1e e %.1e coef %.1e metrics %.1e grad %.1e %s\n", c.name,
                got_loss, loss, err_loss, err_e, err_coef, err_metrics, err_grad, ok ? "ok" : "FAIL");
    return ok;
}

bool run_lora_case(const apo_example::CudaDriver &cu, apo_fk_dtype dtype, int64_t rank, bool bias, std::mt19937 &rng) {
    apo_fk_gated_lora_desc d = lora_desc(rank);
    d.dtype = dtype;
    const int64_t M = d.tokens, K = d.in_features, N = d.out_features, G = M / d.tokens_per_sample;
    std::normal_distribution<float> normal;
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    auto random = [&](size_t n, float s) {
        std::vector<float> v(n);
        for (float &x : v) x = s * normal(rng);
        return v;
    };
    const Stored x = store(random(M * K, 1.0f), dtype), w = store(random(N * K, 1.0f / 8), dtype);
    const Stored b = store(random(N, 0.1f), dtype), a = store(random(rank * K, 1.0f / 8), dtype);
    const Stored bb = store(random(N * rank, 0.5f), dtype), dy = store(random(M * N, 1.0f), dtype);
    std::vector<float> gate(G * rank);
    for (float &g : gate) g = uniform(rng);
    const double s = d.scaling;

    std::vector<double> h(M * rank), y(M * N), u(M * rank), dx(M * K), da(rank * K), dbt(rank * N);
    for (int64_t m = 0; m < M; ++m) {
        const float *g = &gate[(m / d.tokens_per_sample) * rank];
        for (int64_t j = 0; j < rank; ++j) {
            for (int64_t k = 0; k < K; ++k) h[m * rank + j] += (double)x.values[m * K + k] * a.values[j * K + k];
            for (int64_t n = 0; n < N; ++n) u[m * rank + j] += (double)dy.values[m * N + n] * bb.values[n * rank + j];
        }
        for (int64_t n = 0; n < N; ++n) {
            double acc = bias ? b.values[n] : 0.0;
            for (int64_t k = 0; k < K; ++k) acc += (double)x.values[m * K + k] * w.values[n * K + k];
            for (int64_t j = 0; j < rank; ++j) acc += s * h[m * rank + j] * g[j] * bb.values[n * rank + j];
            y[m * N + n] = acc;
        }
        for (int64_t k = 0; k < K; ++k) {
            double acc = 0.0;
            for (int64_t n = 0; n < N; ++n) acc += (double)dy.values[m * N + n] * w.values[n * K + k];
            for (int64_t j = 0; j < rank; ++j) acc += s * u[m * rank + j] * g[j] * a.values[j * K + k];
            dx[m * K + k] = acc;
        }
        for (int64_t j = 0; j < rank; ++j) {
            for (int64_t k = 0; k < K; ++k) da[j * K + k] += s * u[m * rank + j] * g[j] * x.values[m * K + k];
            for (int64_t n = 0; n < N; ++n) dbt[j * N + n] += s * h[m * rank + j] * g[j] * dy.values[m * N + n];
        }
    }

    int splits = 0, per_split = 0;
    if (apo_fk_gated_lora_dadb_splits(&d, 0, &splits, &per_split) != APO_FK_OK) return false;
    const size_t es = dtype_size(dtype);
    apo_example::DeviceBuffer dx_in(cu, x.bytes.size()), dw(cu, w.bytes.size()), dbias(cu, b.bytes.size());
    apo_example::DeviceBuffer dA(cu, a.bytes.size()), dB(cu, bb.bytes.size()), ddy(cu, dy.bytes.size());
    apo_example::DeviceBuffer dgate(cu, gate.size() * 4), dyo(cu, M * N * es), dh(cu, M * rank * es);
    apo_example::DeviceBuffer du(cu, M * rank * 4), ddx(cu, M * K * es);
    apo_example::DeviceBuffer dda(cu, (size_t)splits * rank * K * 4), ddb(cu, (size_t)splits * rank * N * 4);
    dx_in.upload(x.bytes.data(), x.bytes.size());
    dw.upload(w.bytes.data(), w.bytes.size());
    dbias.upload(b.bytes.data(), b.bytes.size());
    dA.upload(a.bytes.data(), a.bytes.size());
    dB.upload(bb.bytes.data(), bb.bytes.size());
    ddy.upload(dy.bytes.data(), dy.bytes.size());
    dgate.upload(gate.data(), gate.size() * 4);
    apo_fk_status status =
        apo_fk_gated_lora_forward(nullptr, &d, dx_in.get(), dw.get(), bias ? dbias.get() : nullptr, dA.get(), dB.get(),
                                  dgate.as<float>(), dyo.get(), dh.get());
    if (status == APO_FK_OK) {
        status = apo_fk_gated_lora_backward_dx(nullptr, &d, ddy.get(), dw.get(), dA.get(), dB.get(), dgate.as<float>(),
                                               ddx.get(), du.as<float>());
    }
    if (status == APO_FK_OK) {
        status = apo_fk_gated_lora_backward_dadb(nullptr, &d, splits, per_split, dx_in.get(), dh.get(), ddy.get(),
                                                 du.as<float>(), dgate.as<float>(), dda.as<float>(), ddb.as<float>());
    }
    if (status != APO_FK_OK) {
        std::fprintf(stderr, "gated LoRA: %s\n", apo_fk_status_string(status));
        return false;
    }
    cu.check(cu.cuCtxSynchronize(), "cuCtxSynchronize");
    std::vector<unsigned char> y_bytes(M * N * es), h_bytes(M * rank * es), dx_bytes(M * K * es);
    std::vector<float> got_u(M * rank), parts_a((size_t)splits * rank * K), parts_b((size_t)splits * rank * N);
    dyo.download(y_bytes.data(), y_bytes.size());
    dh.download(h_bytes.data(), h_bytes.size());
    ddx.download(dx_bytes.data(), dx_bytes.size());
    du.download(got_u.data(), got_u.size() * 4);
    dda.download(parts_a.data(), parts_a.size() * 4);
    ddb.download(parts_b.data(), parts_b.size() * 4);
    std::vector<float> got_da(rank * K, 0.0f), got_dbt(rank * N, 0.0f);
    for (int sp = 0; sp < splits; ++sp) {
        for (size_t i = 0; i < got_da.size(); ++i) got_da[i] += parts_a[sp * got_da.size() + i];
        for (size_t i = 0; i < got_dbt.size(); ++i) got_dbt[i] += parts_b[sp * got_dbt.size() + i];
    }
    const double tol = 3 * storage_tolerance(dtype);
    const double errs[] = {relative_error(load(y_bytes, dtype), y), relative_error(load(h_bytes, dtype), h),
                           relative_error(load(dx_bytes, dtype), dx), relative_error(got_u, u),
                           relative_error(got_da, da), relative_error(got_dbt, dbt)};
    bool ok = true;
    for (double e : errs) ok = ok && e < tol;
    std::printf("gated LoRA %s rank %2lld bias %d | rel err: y %.1e h %.1e dx %.1e u %.1e dA %.1e dB %.1e %s\n",
                dtype == APO_FK_DTYPE_FP16 ? "fp16" : "bf16", (long long)rank, (int)bias, errs[0], errs[1], errs[2],
                errs[3], errs[4], errs[5], ok ? "ok" : "FAIL");
    return ok;
}

int run_gpu() {
    const apo_fk_status driver = apo_fk_driver_status();
    if (driver != APO_FK_OK) {
        std::printf("skipped: %s\n", apo_fk_status_string(driver));
        return 77;
    }
    apo_example::CudaDriver cu;
    if (!cu.loaded()) return 77;
    apo_example::PrimaryContext context(cu);
    int cc = 0, arch = 0, sms = 0;
    CHECK_STATUS(apo_fk_device_query(&cc, &arch, &sms), APO_FK_OK);
    if (arch == 0) {
        std::printf("skipped: compute capability %d.%d has no cubins in this library\n", cc / 10, cc % 10);
        return 77;
    }
    std::printf("device: compute capability %d.%d, %d SMs, sm_%d cubins\n", cc / 10, cc % 10, sms, arch);
    std::mt19937 rng(1234);
    bool ok = true;
    for (apo_fk_dtype t : {APO_FK_DTYPE_FP32, APO_FK_DTYPE_FP16, APO_FK_DTYPE_BF16}) {
        apo_fk_loss_desc nchw = sd_loss_desc();
        nchw.dtype = t;
        nchw.spatial = 32 * 32;
        nchw.lambda_sft = 0.1;
        apo_fk_loss_desc paired = nchw;
        paired.n_samples = 6;
        paired.spatial = 17 * 19;
        paired.mask_channels = 0;
        paired.paired = 1;
        apo_fk_loss_desc cl = nchw;
        cl.layout = APO_FK_LAYOUT_CHANNELS_LAST;
        cl.spatial = 48 * 48;
        apo_fk_loss_desc full = nchw;
        full.n_samples = 2;
        full.channels = 3;
        full.spatial = 33 * 31;
        full.mask_channels = 3;
        full.lambda_mask = 3.0;
        apo_fk_loss_desc big = nchw;  // chunks of several blocks: the BLOCK 2048 variants
        big.n_samples = 64;
        big.spatial = 128 * 128;
        big.mask_channels = 0;
        const LossCase cases[] = {{"nchw broadcast mask", nchw, false, false},
                                  {"paired odd shape, beta vector", paired, true, true},
                                  {"channels_last broadcast mask", cl, false, true},
                                  {"full mask odd shape", full, false, false},
                                  {"64x4x128x128 no mask", big, true, false}};
        for (const LossCase &c : cases) ok = run_loss_case(cu, c, rng) && ok;
    }
    for (apo_fk_dtype t : {APO_FK_DTYPE_FP16, APO_FK_DTYPE_BF16}) {
        for (int64_t rank : {4, 16, 40, 64}) ok = run_lora_case(cu, t, rank, rank != 16, rng) && ok;
    }
    CHECK_STATUS(apo_fk_release_context(context.handle()), APO_FK_OK);
    return ok && failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char **argv) {
    const std::string mode = argc > 1 ? argv[1] : "";
    try {
        if (mode == "no-driver") return run_no_driver();
        if (mode == "fake-driver" && argc > 2) return run_fake_driver(argv[2]);
        if (mode == "no-device") return run_no_device();
        if (mode == "gpu") return run_gpu();
    } catch (const std::exception &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    std::fprintf(stderr, "usage: %s no-driver | no-device | fake-driver <libfake_cuda.so> | gpu\n", argv[0]);
    return 2;
}
