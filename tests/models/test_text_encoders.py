"""CLIP prompt conditioning: prompts encoded once, checked against diffusers' own
``encode_prompt`` of the SD 1.x and SDXL pipelines, and used by the trainer."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from apo_fast.config import ConfigError  # noqa: E402
from apo_fast.demo import demo_config  # noqa: E402
from apo_fast.models.text_encoders import (  # noqa: E402
    check_template,
    condition_prompts,
    encode_prompts,
    prompt_condition_table,
)

MAX_LEN = 12  # the tiny tokenizer's model_max_length (SD's is 77)
HIDDEN = 32  # each tiny encoder's hidden size; the tiny UNet's cross_attention_dim
PROJ = 16  # the second encoder's projection (SDXL's pooled text_embeds)


def _tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_LEN), len(vocab)


def _encoder(vocab_size: int, projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=HIDDEN, intermediate_size=37, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=MAX_LEN, projection_dim=PROJ,
        bos_token_id=0, eos_token_id=1, pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


def write_text_encoders(root: Path, xl: bool) -> Path:
    """A diffusers-layout folder with tokenizer/ + text_encoder/ (and the _2 pair for SDXL)."""
    tok, n = _tokenizer()
    pairs = [("", False)] + ([("_2", True)] if xl else [])
    for suffix, projection in pairs:
        tok.save_pretrained(str(root / f"tokenizer{suffix}"))
        _encoder(n, projection, seed=len(suffix)).save_pretrained(str(root / f"text_encoder{suffix}"))
    return root


NAMES = ["brick/good", "brick/crack", "brick/broken_large"]


def test_prompts_per_condition_and_template_checks():
    prompts = condition_prompts(NAMES, "a {product} with {defect}", "a clean {product}")
    assert prompts == ["", "a clean brick", "a brick with crack", "a brick with broken large"]
    check_template("k", "a {product} with {defect}")
    for bad, words in (("a {colour} brick", "colour"), ("", "non-empty"), ("a {product", "format string")):
        with pytest.raises(ValueError, match=words):
            check_template("model.prompt_template", bad)


def _tiny_pipeline_parts():
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    from apo_fast.config.unet_presets import UNET_PRESETS

    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4)
    return vae, DDIMScheduler(), UNet2DConditionModel(**dict(UNET_PRESETS["tiny"]))


def test_sd_encoding_equals_diffusers_encode_prompt(tmp_path):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    root = write_text_encoders(tmp_path / "sd", xl=False)
    prompts = condition_prompts(NAMES, "a {product} with {defect}", "a photo of a {product}")
    table, pooled = encode_prompts(str(root), prompts)
    assert table.shape == (len(prompts), MAX_LEN, HIDDEN) and pooled is None

    vae, scheduler, unet = _tiny_pipeline_parts()
    pipe = StableDiffusionPipeline(
        vae=vae, unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        text_encoder=CLIPTextModel.from_pretrained(str(root / "text_encoder")),
        tokenizer=CLIPTokenizer.from_pretrained(str(root / "tokenizer")), requires_safety_checker=False,
    )
    with torch.no_grad():
        cond, uncond = pipe.encode_prompt(prompts[1:], "cpu", 1, True)
    torch.testing.assert_close(table[1:], cond.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(table[0], uncond[0].float(), rtol=1e-6, atol=1e-6)  # null row: ""
    assert not torch.allclose(table[1], table[2])  # different prompts, different rows


def test_sdxl_encoding_equals_diffusers_encode_prompt(tmp_path):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from apo_fast.config import ModelConfig

    root = write_text_encoders(tmp_path / "xl", xl=True)
    model_cfg = ModelConfig(text_encoder=str(root), prompt_template="a {product} with {defect}")
    table, pooled, prompts = prompt_condition_table(model_cfg, NAMES, MAX_LEN, 2 * HIDDEN, PROJ)
    assert table.shape == (len(NAMES) + 1, MAX_LEN, 2 * HIDDEN) and pooled.shape == (len(NAMES) + 1, PROJ)

    vae, scheduler, unet = _tiny_pipeline_parts()
    pipe = StableDiffusionXLPipeline(
        vae=vae, unet=unet, scheduler=scheduler,
        text_encoder=CLIPTextModel.from_pretrained(str(root / "text_encoder")),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(str(root / "text_encoder_2")),
        tokenizer=CLIPTokenizer.from_pretrained(str(root / "tokenizer")),
        tokenizer_2=CLIPTokenizer.from_pretrained(str(root / "tokenizer_2")),
    )
    with torch.no_grad():
        cond, uncond, cond_pooled, uncond_pooled = pipe.encode_prompt(prompts[1:], device="cpu",
                                                                      do_classifier_free_guidance=True)
    torch.testing.assert_close(table[1:], cond.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(pooled[1:], cond_pooled.float(), rtol=1e-6, atol=1e-6)
    # the null row: SDXL pipelines use zeros when no negative prompt is given
    torch.testing.assert_close(table[0], uncond[0].float(), rtol=0, atol=0)
    torch.testing.assert_close(pooled[0], uncond_pooled[0].float(), rtol=0, atol=0)
    assert table[1:].abs().sum() > 0 and pooled[1:].abs().sum() > 0


def test_mismatches_with_the_unet_are_clear_errors(tmp_path):
    from apo_fast.config import ModelConfig

    sd = write_text_encoders(tmp_path / "sd", xl=False)
    cfg = ModelConfig(text_encoder=str(sd), prompt_template="{defect} on {product}")
    with pytest.raises(ValueError, match=rf"model.cond_tokens is 4 .* pads prompts to {MAX_LEN} tokens"):
        prompt_condition_table(cfg, NAMES, 4, HIDDEN, None)
    with pytest.raises(ValueError, match="cross_attention_dim is 64"):
        prompt_condition_table(cfg, NAMES, MAX_LEN, 64, None)
    with pytest.raises(ValueError, match="pooled text vector of size 16"):
        prompt_condition_table(cfg, NAMES, MAX_LEN, HIDDEN, PROJ)
    with pytest.raises(FileNotFoundError, match="no CLIP tokenizer/text_encoder"):
        encode_prompts(str(tmp_path / "missing"), ["a brick"])


def _cfg(tmp_path, *overrides):
    base = ["data.image_size=16", "train.batch_size=2", "train.steps=2", "train.log_every=1",
            "train.progress=false", "train.device=cpu", f"model.cond_tokens={MAX_LEN}"]
    return demo_config(str(tmp_path / "run"), base + list(overrides))


def test_config_refuses_bad_prompt_settings_before_any_work(tmp_path):
    with pytest.raises(ConfigError, match="model.prompt_template.*placeholder"):
        _cfg(tmp_path, "model.prompt_template='{colour} brick'", "model.text_encoder=/x")
    with pytest.raises(ConfigError, match="model.good_prompt_template"):
        _cfg(tmp_path, "model.prompt_template='{defect}'", "model.good_prompt_template=''", "model.text_encoder=/x")
    with pytest.raises(ConfigError, match="needs a text encoder"):
        _cfg(tmp_path, "model.prompt_template='{defect}'")


XL_UNET = ('model.unet={"cross_attention_dim": 64, "addition_embed_type": "text_time", '
           '"addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 64}')


@pytest.mark.slow
@pytest.mark.parametrize("xl", [False, True], ids=["sd", "sdxl"])
def test_trainer_starts_from_the_prompt_encodings_and_frozen_rows_stay_them(tmp_path, xl):
    from safetensors.torch import load_file

    from apo_fast.config import ModelConfig
    from apo_fast.training.trainer import APOTrainer

    root = write_text_encoders(tmp_path / "enc", xl=xl)
    template = "a {product} with {defect}"
    cfg = _cfg(tmp_path, f"model.text_encoder={root}", f"model.prompt_template='{template}'", "optim.cond_lr=0",
               *([XL_UNET] if xl else []))
    trainer = APOTrainer(cfg).setup()
    try:
        names = trainer.data.condition_names
        expected, expected_pooled, _ = prompt_condition_table(
            ModelConfig(text_encoder=str(root), prompt_template=template), names, MAX_LEN,
            2 * HIDDEN if xl else HIDDEN, PROJ if xl else None)
        conditions = trainer.engine.module.conditions
        torch.testing.assert_close(conditions.weight.detach(), expected, rtol=0, atol=0)
        if xl:
            torch.testing.assert_close(conditions.pooled.detach(), expected_pooled, rtol=0, atol=0)
            assert conditions.weight[0].abs().sum() == 0  # SDXL's null condition: zeros
        trainer.train()
    finally:
        trainer.close()
    saved = load_file(str(Path(cfg.output_dir) / "adapters" / "conditions.safetensors"))
    for row, name in enumerate(["null", *names]):
        torch.testing.assert_close(saved[name], expected[row], rtol=0, atol=0)
        if xl:
            torch.testing.assert_close(saved["pooled/" + name], expected_pooled[row], rtol=0, atol=0)
