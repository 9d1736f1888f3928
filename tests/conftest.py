import os

# The Triton interpreter must be chosen before triton is imported anywhere:
# it lets the fused kernels run on CPU tensors in the tests.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("APO_FAST_BACKEND", "auto")

# Tiny models run several times faster on one thread than on two contending ones,
# and subprocess tests (torchrun ranks, CLI runs) inherit this. APO_FAST_TEST_THREADS=2
# runs the suite on two threads (every bound must hold at any thread count).
_THREADS = int(os.environ.get("APO_FAST_TEST_THREADS", "1"))
os.environ.setdefault("OMP_NUM_THREADS", str(_THREADS))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(_THREADS)


@pytest.fixture(autouse=True)
def _seed_everything():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def make_tiny_unet():
    """Builder of the small seeded cross-attention UNet the adapter tests share (4 channels, 16 px)."""
    import diffusers

    def build():
        torch.manual_seed(1234)
        return diffusers.UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            attention_head_dim=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            norm_num_groups=8,
        )

    return build


@pytest.fixture(scope="session")
def make_peft_unet(make_tiny_unet):
    """Builder of the tiny UNet in float64 with peft LoRA added the way diffusers'
    train_diffusion_dpo.py adds it (``unet.add_adapter``), B made non-zero."""
    from peft import LoraConfig

    def build(target_modules):
        unet = make_tiny_unet().to(torch.float64)
        unet.requires_grad_(False)
        unet.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights="gaussian", target_modules=target_modules))
        torch.manual_seed(7)
        with torch.no_grad():
            for name, p in unet.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        return unet

    return build


F64_EPS = torch.finfo(torch.float64).eps


def f64_terms(model: torch.nn.Module, tokens: int = 1) -> int:
    """How many rounded operations one output or gradient element of ``model`` accumulates:
    the number of weight layers a value passes through (forward and backward) times the
    longest reduction of any of them (a layer's fan-in, or the ``tokens`` a weight
    gradient sums over). Each float64 multiply-add adds at most one unit roundoff
    relative to the magnitudes involved, so this count times eps bounds the difference
    of two correct implementations, whatever the thread count, BLAS kernel or summation order."""
    layers, longest = 0, tokens
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            layers, longest = layers + 1, max(longest, m.in_features)
        elif isinstance(m, torch.nn.Conv2d):
            fan_in = m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
            layers, longest = layers + 1, max(longest, fan_in)
    return 2 * max(layers, 1) * longest


def assert_close_f64(actual: torch.Tensor, expected: torch.Tensor, *, terms: int, msg: str = "") -> None:
    """``actual`` equals ``expected`` (float64, same dtype) within the rounding of ``terms`` operations:
    max |actual - expected| <= 2 * terms * eps * max |expected| (norm-wise, so an element that
    cancels to nearly zero is judged against the tensor's scale; the 2: both sides round).
    A real mistake (a scaling off by 1e-6, a missing term) is orders of magnitude above it."""
    assert actual.shape == expected.shape, f"{msg}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{msg}: dtype {actual.dtype} != {expected.dtype}"
    info = torch.finfo(expected.dtype)  # float64 normally; a float32 leaf (a gate MLP) is judged by its own eps
    scale = expected.abs().max().item() if expected.numel() else 0.0
    bound = 2 * terms * info.eps * max(scale, info.tiny)
    err = (actual - expected).abs().max().item() if expected.numel() else 0.0
    assert err <= bound, (
        f"{msg}: max |error| {err:.3e} > bound {bound:.3e} (2 x {terms} terms x eps x max|expected| {scale:.3e})"
    )


@pytest.fixture(scope="session")
def f64_close():
    """(assert_close_f64, f64_terms) for tests (conftest helpers are not importable as a module)."""
    return assert_close_f64, f64_terms
