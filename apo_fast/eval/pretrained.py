"""Pretrained networks for generation metrics, from local files only.

LPIPS (for IC-LPIPS) and Inception-v3 (for IS and KID) need pretrained
weights. They are taken from the local torch hub cache
(``torch.hub.get_dir()/checkpoints``, i.e. ``$TORCH_HOME/hub/checkpoints``,
where torchvision keeps what it once downloaded) or from a path the user
configures. Nothing is ever downloaded: when a package or a file is missing a
:class:`MissingWeightsError` says what is missing and where it looked, and the
report skips only the metric that needs it.

File names are torchvision's (``alexnet-owt-7be5be79.pth``,
``vgg16-397923af.pth``, ``squeezenet1_1-b8a52dc0.pth``,
``inception_v3_google-0cc3c7bd.pth``); any version matching the same prefix
is accepted. The LPIPS linear calibration layers ship inside the ``lpips``
package (``lpips/weights/v0.1/<net>.pth``).

Note: KID/IS here use torchvision's Inception-v3 (ImageNet, 1000 classes);
torch-fidelity and clean-fid use the TF-ported FID Inception (1008 classes),
so absolute numbers differ slightly from published ones; comparisons between
data sources made with the same network are what this engine reports.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

LPIPS_BACKBONE_PATTERNS = {
    "alex": ("alexnet-owt-*.pth", "alexnet-*.pth"),
    "vgg": ("vgg16-*.pth",),
    "squeeze": ("squeezenet1_1-*.pth",),
}
INCEPTION_PATTERNS = ("inception_v3_google-*.pth",)
INCEPTION_SIZE = 299


class MissingWeightsError(RuntimeError):
    """A pretrained network, its Python package or its weights are not available locally."""


def hub_checkpoint_dir() -> Path:
    """The torch hub checkpoint folder (``$TORCH_HOME/hub/checkpoints``)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def import_or_missing(module: str, what: str, pip_name: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingWeightsError` naming the package."""
    package = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingWeightsError(
            f"{what} needs the Python package '{package}', which is not installed "
            f"(pip install {pip_name or package}); its weights would be read from {str(hub_checkpoint_dir())!r} "
            f"or a configured weights_path. This metric is skipped"
        ) from exc
    except (RuntimeError, OSError) as exc:  # e.g. a torchvision built for another torch
        raise MissingWeightsError(
            f"{what} needs the Python package '{package}', which failed to import: {exc}"
        ) from exc


def find_weights(what: str, patterns: tuple[str, ...], weights_path: str | Path | None = None) -> Path:
    """Locate a checkpoint file.

    Args:
        what: human name of the network, for messages.
        patterns: glob patterns of acceptable file names.
        weights_path: a file (used as is) or a folder (searched with
            ``patterns``); None searches the torch hub checkpoint folder.

    Raises:
        MissingWeightsError: naming the patterns and every place searched.
    """
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if path.is_file():
            return path
        if not path.is_dir():
            raise MissingWeightsError(f"{what} weights: configured weights_path {str(path)!r} does not exist")
        folders = [path]
    else:
        folders = [hub_checkpoint_dir()]
    for folder in folders:
        for pattern in patterns:
            matches = sorted(folder.glob(pattern))
            if matches:
                return matches[-1]
    where = ", ".join(repr(str(f)) for f in folders)
    raise MissingWeightsError(
        f"{what} weights not found: looked for {' or '.join(patterns)} in {where}. "
        f"Copy torchvision's checkpoint there or pass weights_path=...; nothing is downloaded"
    )


# --------------------------------------------------------------------------- LPIPS


def load_lpips(
    net: str = "alex",
    *,
    backbone_weights: str | Path | None = None,
    lpips_weights: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> nn.Module:
    """Build ``lpips.LPIPS`` from local files only.

    Args:
        net: backbone, "alex" (the default of the papers' code), "vgg" or "squeeze".
        backbone_weights: torchvision ImageNet checkpoint of the backbone (file
            or folder); None searches the torch hub cache.
        lpips_weights: LPIPS linear layers; None uses the file shipped in the
            ``lpips`` package (``weights/v0.1/<net>.pth``).
        device: where the model lives.

    Returns:
        The LPIPS module in eval mode, no gradients; call it as ``model(a, b)``
        on [-1, 1] images (N,3,H,W) -> (N,1,1,1).

    Raises:
        MissingWeightsError: ``lpips``/``torchvision`` not installed or a file missing.
    """
    if net not in LPIPS_BACKBONE_PATTERNS:
        raise ValueError(f"net must be one of {tuple(LPIPS_BACKBONE_PATTERNS)}, got {net!r}")
    import_or_missing("torchvision", "LPIPS")
    lpips = import_or_missing("lpips", "LPIPS")
    if lpips_weights is None:
        lin_path = Path(lpips.__file__).resolve().parent / "weights" / "v0.1" / f"{net}.pth"
    else:
        lin_path = Path(lpips_weights).expanduser()
    if not lin_path.is_file():
        raise MissingWeightsError(f"LPIPS linear-layer weights not found at {str(lin_path)!r}")
    backbone_path = find_weights(f"LPIPS {net} backbone", LPIPS_BACKBONE_PATTERNS[net], backbone_weights)

    # pnet_rand=True builds the backbone without asking torchvision for weights
    # (so nothing can be downloaded); the local checkpoint is loaded below.
    model = lpips.LPIPS(
        pretrained=True, net=net, version="0.1", pnet_rand=True, model_path=str(lin_path), verbose=False
    )
    _load_backbone(model.net, torch.load(backbone_path, map_location="cpu", weights_only=True), backbone_path)
    return model.eval().requires_grad_(False).to(device)


def _load_backbone(sliced: nn.Module, state: dict, path: Path) -> None:
    """Copy torchvision ``features.<i>.*`` tensors into LPIPS' ``slice<k>.<i>.*`` layout."""
    slice_of = {}
    for slice_name, block in sliced.named_children():
        for index, _ in block.named_children():
            slice_of[index] = slice_name
    mapped = {}
    for key, value in state.items():
        if not key.startswith("features."):
            continue
        index, rest = key[len("features."):].split(".", 1)
        if index in slice_of:
            mapped[f"{slice_of[index]}.{index}.{rest}"] = value
    try:
        sliced.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise RuntimeError(f"backbone checkpoint {str(path)!r} does not match the LPIPS backbone: {exc}") from exc


def lpips_distance(model: nn.Module, *, min_size: int = 64):
    """Paired LPIPS distance function for :mod:`apo_fast.eval.diversity`.

    Images smaller than ``min_size`` are upsampled (bilinear) first: the
    backbones' strided layers need some spatial extent.

    Returns:
        ``fn(a, b)`` mapping [-1, 1] images (N,3,H,W) x (N,3,H,W) to (N,) distances.
    """
    device = next(model.parameters()).device

    def distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if min(a.shape[-2:]) < min_size:
            size = [max(min_size, s) for s in a.shape[-2:]]
            a = F.interpolate(a, size=size, mode="bilinear", align_corners=False)
            b = F.interpolate(b, size=size, mode="bilinear", align_corners=False)
        with torch.no_grad():
            return model(a.to(device, torch.float32), b.to(device, torch.float32)).reshape(-1)

    return distance


# --------------------------------------------------------------------------- Inception


class InceptionFeatureExtractor(nn.Module):
    """Inception-v3 pool features (2048) and ImageNet logits (1000) of [-1, 1] images.

    Images are resized to 299x299 (bilinear). torchvision's weights expect
    [-1, 1] inputs once its ``transform_input`` is off, so no extra
    normalisation is applied.
    """

    def __init__(self, inception: nn.Module):
        super().__init__()
        self.fc = inception.fc
        inception.fc = nn.Identity()  # the wrapped network now returns pooled features
        self.backbone = inception
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,3,H,W) in [-1, 1] -> (pool (N,2048), logits (N,1000))."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must have shape (N,3,H,W), got {tuple(images.shape)}")
        x = F.interpolate(images.float(), size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        pool = self.backbone(x)
        return pool, self.fc(pool)


def load_inception(
    weights_path: str | Path | None = None, *, device: str | torch.device = "cpu"
) -> InceptionFeatureExtractor:
    """torchvision Inception-v3 from a local checkpoint.

    Args:
        weights_path: checkpoint file or folder; None searches the torch hub cache.
        device: where the network lives.

    Raises:
        MissingWeightsError: torchvision not installed or no checkpoint found.
    """
    tv_models = import_or_missing("torchvision.models", "Inception-v3 (IS, KID)", pip_name="torchvision")
    path = find_weights("Inception-v3", INCEPTION_PATTERNS, weights_path)
    net = tv_models.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return InceptionFeatureExtractor(net).to(device)


def inception_features(
    images: torch.Tensor, extractor: nn.Module, *, batch_size: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``extractor`` over (N,3,H,W) [-1, 1] images in batches.

    Returns:
        (pool (N,2048), logits (N,1000)) as float64 CPU tensors.
    """
    device = next(extractor.parameters()).device
    pools, logits = [], []
    for start in range(0, images.shape[0], batch_size):
        p, lg = extractor(images[start:start + batch_size].to(device))
        pools.append(p.double().cpu())
        logits.append(lg.double().cpu())
    return torch.cat(pools), torch.cat(logits)
