import os

# The Triton interpreter must be chosen before triton is imported anywhere:
# it lets the fused kernels run on CPU tensors in the tests.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("APO_FAST_BACKEND", "auto")

# Tiny models run several times faster on one thread than on two contending ones,
# and subprocess tests (torchrun ranks, CLI runs) inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


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
