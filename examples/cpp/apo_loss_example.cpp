// The fused APO loss from C++: plan, forward (loss, metrics), gradient, and a
// check against a double-precision host computation.
//
//   ./apo_loss_example
//
// Data: 4 samples of (4, 32, 32) float32 latents, a (4, 1, 32, 32) anomaly mask
// with lambda_mask = 2, beta = 5, unpaired. Without a CUDA driver or GPU it
// prints the plan and the library's status and exits 0.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "apo_fast_kernels.h"
#include "cuda_driver.hpp"

namespace {

constexpr int kSamples = 4, kChannels = 4, kSpatial = 32 * 32;

// Loss of apo_fast.loss.apo_loss (unpaired, scalar beta), in double.
double reference_loss(const std::vector<float> &p, const std::vector<float> &r, const std::vector<float> &t,
                      const std::vector<float> &mask, double lambda_mask, double beta, std::vector<double> &coef) {
    const int n = kChannels * kSpatial;
    double loss = 0.0;
    coef.assign(kSamples, 0.0);
    for (int b = 0; b < kSamples; ++b) {
        double e = 0.0, e_ref = 0.0;
        for (int c = 0; c < kChannels; ++c) {
            for (int s = 0; s < kSpatial; ++s) {
                const size_t i = (size_t)b * n + (size_t)c * kSpatial + s;
                const double w = 1.0 + (lambda_mask - 1.0) * mask[(size_t)b * kSpatial + s];
                e += w * (p[i] - t[i]) * (p[i] - t[i]);
                e_ref += w * (r[i] - t[i]) * (r[i] - t[i]);
            }
        }
        e /= n;
        e_ref /= n;
        const double z = beta * (e - e_ref);
        loss += std::log1p(std::exp(-std::fabs(z))) + std::fmax(z, 0.0);
        coef[b] = 1.0 / (1.0 + std::exp(-z)) / kSamples * beta * 2.0 / n;
    }
    return loss / kSamples;
}

int fail(const char *what, apo_fk_status status) {
    std::fprintf(stderr, "%s: %s (CUresult %d)\n", what, apo_fk_status_string(status), apo_fk_last_cuda_error());
    return 1;
}

}  // namespace

int main() {
    apo_fk_loss_desc desc{};
    desc.dtype = APO_FK_DTYPE_FP32;
    desc.layout = APO_FK_LAYOUT_CONTIGUOUS;
    desc.n_samples = kSamples;
    desc.channels = kChannels;
    desc.spatial = kSpatial;
    desc.mask_channels = 1;  // (B, 1, H, W), broadcast over the channels
    desc.lambda_mask = 2.0;
    desc.lambda_sft = 0.0;
    desc.beta = 5.0;
    desc.paired = 0;

    const apo_fk_status driver = apo_fk_driver_status();
    if (driver != APO_FK_OK) {
        // No GPU here: show what the launch would look like on an H100/H200 (132 SMs).
        apo_fk_loss_plan plan;
        apo_fk_status status = apo_fk_loss_plan_make(&desc, 132, &plan);
        if (status != APO_FK_OK) return fail("apo_fk_loss_plan_make", status);
        std::printf("CUDA unavailable: %s\n", apo_fk_status_string(driver));
        std::printf("plan for 132 SMs: grid (%lld, %lld), chunk %lld, %lld partial floats, %d kernel variants\n",
                    (long long)desc.n_samples, (long long)plan.n_chunks, (long long)plan.chunk,
                    (long long)plan.partials_floats, apo_fk_variant_count());
        return 0;
    }

    apo_example::CudaDriver cu;
    if (!cu.loaded()) {
        std::fprintf(stderr, "libcuda.so.1 lacks the calls this example uses\n");
        return 1;
    }
    apo_example::PrimaryContext context(cu);

    apo_fk_loss_plan plan;
    apo_fk_status status = apo_fk_loss_plan_make(&desc, 0, &plan);  // 0: ask the current device
    if (status != APO_FK_OK) return fail("apo_fk_loss_plan_make", status);

    const size_t numel = (size_t)kSamples * kChannels * kSpatial;
    std::mt19937 rng(0);
    std::normal_distribution<float> normal;
    std::bernoulli_distribution anomaly(0.2);
    std::vector<float> p(numel), r(numel), t(numel), mask((size_t)kSamples * kSpatial);
    for (size_t i = 0; i < numel; ++i) {
        t[i] = normal(rng);
        p[i] = t[i] + 0.5f * normal(rng);
        r[i] = t[i] + 0.5f * normal(rng);
    }
    for (float &m : mask) m = anomaly(rng) ? 1.0f : 0.0f;

    apo_example::DeviceBuffer d_p(cu, numel * 4), d_r(cu, numel * 4), d_t(cu, numel * 4);
    apo_example::DeviceBuffer d_mask(cu, mask.size() * 4), d_grad(cu, numel * 4);
    apo_example::DeviceBuffer d_partials(cu, (size_t)plan.partials_floats * 4);
    apo_example::DeviceBuffer d_stats(cu, (size_t)plan.stats_floats * 4), d_loss(cu, 4);
    d_p.upload(p.data(), numel * 4);
    d_r.upload(r.data(), numel * 4);
    d_t.upload(t.data(), numel * 4);
    d_mask.upload(mask.data(), mask.size() * 4);

    status = apo_fk_loss_forward(nullptr, &plan, d_p.get(), d_r.get(), d_t.get(), d_mask.get(), nullptr,
                                 d_partials.as<float>(), d_stats.as<float>(), d_loss.as<float>());
    if (status != APO_FK_OK) return fail("apo_fk_loss_forward", status);
    status = apo_fk_loss_grad(nullptr, &plan, d_p.get(), d_t.get(), d_mask.get(), d_stats.as<float>(), nullptr,
                              d_grad.get());
    if (status != APO_FK_OK) return fail("apo_fk_loss_grad", status);
    cu.check(cu.cuCtxSynchronize(), "cuCtxSynchronize");

    float loss = 0.0f;
    std::vector<float> stats((size_t)plan.stats_floats), grad(numel);
    d_loss.download(&loss, 4);
    d_stats.download(stats.data(), stats.size() * 4);
    d_grad.download(grad.data(), numel * 4);

    std::vector<double> coef;
    const double expected = reference_loss(p, r, t, mask, desc.lambda_mask, desc.beta, coef);
    double grad_error = 0.0, grad_scale = 0.0;
    for (size_t i = 0; i < numel; ++i) {
        const size_t b = i / ((size_t)kChannels * kSpatial), s = i % kSpatial;
        const double w = 1.0 + (desc.lambda_mask - 1.0) * mask[b * kSpatial + s];
        const double g = coef[b] * w * ((double)p[i] - t[i]);
        grad_error = std::fmax(grad_error, std::fabs(g - grad[i]));
        grad_scale = std::fmax(grad_scale, std::fabs(g));
    }
    std::printf("loss %.6f (host reference %.6f), implicit accuracy %.3f\n", loss, expected, stats[3 * kSamples + 5]);
    std::printf("gradient: max |error| %.3g of max |grad| %.3g\n", grad_error, grad_scale);
    apo_fk_release_context(context.handle());
    const bool ok = std::fabs(loss - expected) <= 1e-4 * std::fmax(1.0, std::fabs(expected)) &&
                    grad_error <= 1e-4 * grad_scale;
    return ok ? 0 : 1;
}
