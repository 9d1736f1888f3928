"""Condition embeddings from a checkpoint's CLIP text encoder(s), encoded once.

APO_SPEC: the condition ``c`` is a learned embedding per (product, defect
type); for Stable Diffusion checkpoints a CLIP text encoder with prompts is the
alternative. Here the prompts of every condition are encoded once, before
training, exactly as diffusers' pipelines encode a prompt, and become the
initial rows of :class:`apo_fast.models.ConditionEmbedding`. The encoders are
then dropped (nothing text-related stays on the GPU: the condition embeddings
are cached). With ``optim.cond_lr: 0`` the rows stay the CLIP encodings (plain
prompt conditioning); otherwise they are fine-tuned from them (textual
inversion style).

Encoding rules (those of diffusers' ``encode_prompt``, checked against it in
``tests/models/test_text_encoders.py``):

- SD 1.x/2.x (``tokenizer/`` + ``text_encoder/``): prompts padded to the
  tokenizer's ``model_max_length`` (77), the encoder's last hidden state.
- SDXL (also ``tokenizer_2/`` + ``text_encoder_2/``): the penultimate hidden
  state of both encoders concatenated on the feature axis, and the second
  encoder's projected pooled output as the pooled vector (``text_embeds``).
- The null condition (row 0, classifier-free guidance) is what diffusers uses
  when no negative prompt is given: the encoding of ``""`` for SD 1.x/2.x,
  zeros for SDXL (its pipelines' default ``force_zeros_for_empty_prompt``).
"""
from __future__ import annotations

from pathlib import Path

import torch

from apo_fast.config.checks import PLACEHOLDERS, check_template

__all__ = [
    "PLACEHOLDERS",
    "check_template",
    "condition_prompts",
    "encode_prompts",
    "has_second_encoder",
    "prompt_condition_table",
]

def condition_prompts(names: list[str], template: str, good_template: str) -> list[str]:
    """The prompts of the rows of a condition table: ``""`` (null), then one per name.

    Names are ``"<product>/<defect>"`` (:func:`apo_fast.data.condition_names`);
    ``good`` uses ``good_template``; underscores read as spaces
    (``broken_large`` -> ``broken large``).
    """
    prompts = [""]
    for name in names:
        product, _, defect = name.partition("/")
        fill = {"product": product.replace("_", " "), "defect": defect.replace("_", " ")}
        prompts.append((good_template if defect == "good" else template).format(**fill))
    return prompts


def has_second_encoder(source: str) -> bool:
    """Whether a local diffusers folder holds SDXL's second tokenizer and text encoder."""
    root = Path(source)
    return (root / "text_encoder_2").is_dir() and (root / "tokenizer_2").is_dir()


def _load(source: str, suffix: str, projection: bool, revision, local_files_only: bool):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    model_cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    common = dict(revision=revision, local_files_only=local_files_only)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(source, subfolder=f"tokenizer{suffix}", **common)
        encoder = model_cls.from_pretrained(source, subfolder=f"text_encoder{suffix}", **common)
    except OSError as exc:
        raise FileNotFoundError(
            f"no CLIP tokenizer{suffix}/text_encoder{suffix} found in {source!r} (nothing is downloaded, "
            f"local_files_only={local_files_only}): {exc}"
        ) from exc
    return tokenizer, encoder.eval().requires_grad_(False)


def _token_ids(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


@torch.no_grad()
def encode_prompts(
    source: str,
    prompts: list[str],
    *,
    revision: str | None = None,
    local_files_only: bool = True,
    device: torch.device | str = "cpu",
    batch_size: int = 16,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Encode ``prompts`` with the CLIP text encoder(s) of a diffusers folder ``source``.

    Returns:
        ``(tokens (N, L, D), pooled (N, P) or None)`` in float32 on the CPU: ``L``
        is the tokenizer's ``model_max_length``; ``D`` the encoder's hidden size
        (SDXL: both encoders' sizes added), ``pooled`` SDXL's ``text_embeds``.
    """
    if not prompts:
        raise ValueError("encode_prompts needs at least one prompt")
    device = torch.device(device)
    encoders = [_load(source, "", False, revision, local_files_only)]
    if Path(source).is_dir():
        second = has_second_encoder(source)
        if second:
            encoders.append(_load(source, "_2", True, revision, local_files_only))
    else:  # a hub id (from the local cache): SDXL if it has the second pair
        try:
            encoders.append(_load(source, "_2", True, revision, local_files_only))
        except FileNotFoundError:
            pass
        second = len(encoders) == 2
    tokens, pooled = [], []
    for tokenizer, encoder in encoders:
        encoder.to(device)
        parts, pools = [], []
        for i in range(0, len(prompts), batch_size):
            ids = _token_ids(tokenizer, prompts[i : i + batch_size]).to(device)
            out = encoder(ids, output_hidden_states=second)
            parts.append((out.hidden_states[-2] if second else out.last_hidden_state).float().cpu())
            if second and hasattr(out, "text_embeds"):
                pools.append(out.text_embeds.float().cpu())
        encoder.to("cpu")
        tokens.append(torch.cat(parts))
        if pools:
            pooled.append(torch.cat(pools))
    lengths = {t.shape[1] for t in tokens}
    if len(lengths) != 1:
        raise ValueError(f"the two tokenizers of {source!r} pad to different lengths {sorted(lengths)}")
    return torch.cat(tokens, dim=-1), (pooled[0] if pooled else None)


def _zero_empty_prompts(prompts: list[str], table: torch.Tensor, pooled: torch.Tensor | None) -> None:
    """SDXL's null condition: zeros where the prompt is empty (``force_zeros_for_empty_prompt``)."""
    for row, prompt in enumerate(prompts):
        if prompt == "":
            table[row].zero_()
            if pooled is not None:
                pooled[row].zero_()


def prompt_condition_table(
    model_cfg,
    names: list[str],
    tokens: int,
    dim: int,
    pooled: int | None,
    device: torch.device | str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor | None, list[str]]:
    """The initial condition table of a run whose ``model.prompt_template`` is set.

    Encodes :func:`condition_prompts` with the text encoder(s) of
    ``model.text_encoder`` (default ``model.pretrained``) and checks the result
    against the UNet: ``tokens`` (``model.cond_tokens``), ``dim`` (its
    ``cross_attention_dim``) and ``pooled`` (its pooled size, None if it takes none).

    Returns:
        ``(rows (len(names) + 1, tokens, dim), pooled rows or None, prompts)``.
    """
    source = model_cfg.text_encoder or model_cfg.pretrained
    prompts = condition_prompts(names, model_cfg.prompt_template, model_cfg.good_prompt_template)
    table, pooled_table = encode_prompts(
        source, prompts, revision=model_cfg.revision, local_files_only=model_cfg.local_files_only, device=device
    )
    if pooled_table is not None:  # SDXL
        _zero_empty_prompts(prompts, table, pooled_table)
    if table.shape[1] != tokens:
        raise ValueError(
            f"model.cond_tokens is {tokens} but the tokenizer of {source!r} pads prompts to {table.shape[1]} tokens; "
            f"set model.cond_tokens: {table.shape[1]}"
        )
    if table.shape[2] != dim:
        raise ValueError(
            f"the text encoder(s) of {source!r} give {table.shape[2]} features per token but the UNet's "
            f"cross_attention_dim is {dim}"
        )
    if (pooled_table is None) != (pooled is None) or (pooled is not None and pooled_table.shape[1] != pooled):
        have = None if pooled_table is None else pooled_table.shape[1]
        raise ValueError(
            f"the UNet takes a pooled text vector of size {pooled} but the text encoder(s) of {source!r} give {have} "
            "(SDXL UNets need tokenizer_2/ and text_encoder_2/)"
        )
    return table, pooled_table, prompts
