"""Free-sample masks of a mask-input run: drawn from the training masks under the run's symmetries."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from apo_fast.sampling.mask_bank import MaskBank, load_mask_bank, save_mask_bank


def _masks(n=5, size=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, size, size, generator=g) > 0.6).float()


def _box(m: torch.Tensor) -> tuple[int, int]:
    """(height, width) of the mask's bounding box."""
    rows, cols = m[0].amax(1).nonzero().flatten(), m[0].amax(0).nonzero().flatten()
    return int(rows[-1] - rows[0]) + 1, int(cols[-1] - cols[0]) + 1


def _symmetries(m: torch.Tensor, shifts: bool) -> list[torch.Tensor]:
    out = []
    for v in range(8):
        x = m
        if v & 1:
            x = x.flip(-1)
        if v & 2:
            x = x.flip(-2)
        if v & 4:
            x = x.transpose(-1, -2)
        if shifts:
            out += [torch.roll(x, (dy, dx), (-2, -1)) for dy in range(m.shape[-2]) for dx in range(m.shape[-1])]
        else:
            out.append(x)
    return out


@pytest.mark.parametrize("augment", ["none", "flip", "dihedral"])
def test_draws_are_training_masks_under_the_runs_symmetries(augment, tmp_path):
    masks = _masks()
    conds = torch.tensor([0, 1, 1, 2, 1])
    names = ["p/a", "p/b", "p/c"]
    bank = load_mask_bank(save_mask_bank(tmp_path / "bank.safetensors", masks, conds, names, augment))
    assert bank.augment == augment and sorted(bank.masks) == names
    torch.testing.assert_close(bank.masks["p/b"], masks[conds == 1])
    drawn = bank.draw("p/b", 12, torch.Generator().manual_seed(3))
    assert drawn.shape == (12, 1, 9, 9)
    allowed = {"none": [0], "flip": [0, 1], "dihedral": list(range(8))}[augment]
    for d in drawn:
        candidates = []
        for m in masks[conds == 1]:
            sym = _symmetries(m, shifts=augment == "dihedral")
            per = len(sym) // 8
            candidates += [s for v in allowed for s in sym[v * per:(v + 1) * per]]
        assert any(torch.equal(d, c) for c in candidates)
        assert _box(d) in {_box(c) for c in candidates if c.sum() > 0} or d.sum() == 0  # never split at a border
    again = bank.draw("p/b", 12, torch.Generator().manual_seed(3))
    assert torch.equal(drawn, again)  # the generator alone decides


def test_bad_banks_are_named(tmp_path):
    with pytest.raises(ValueError, match="augment must be one of"):
        MaskBank({"p/a": _masks()}, "rotate")
    with pytest.raises(ValueError, match=r"must be \(N>0, 1, H, W\)"):
        MaskBank({"p/a": torch.zeros(0, 1, 4, 4)}, "none")
    bank = MaskBank({"p/a": _masks()}, "none")
    with pytest.raises(ValueError, match="no masks for 'p/z'"):
        bank.draw("p/z", 1, torch.Generator())
    with pytest.raises(FileNotFoundError, match="adapter.mask_input keeps its training masks"):
        load_mask_bank(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="cond_ids"):
        save_mask_bank(tmp_path / "b.safetensors", _masks(), torch.zeros(3, dtype=torch.long), ["p/a"], "none")


def test_texture_draws_move_the_mask_whole_to_many_places():
    """dihedral (texture) draws shift the mask anywhere it fits, never wrapped across a border."""
    mask = torch.zeros(1, 1, 10, 10)
    mask[0, 0, 7:10, 8:10] = 1.0  # a 3x2 blob in the corner: any wrap-around would split it
    bank = MaskBank({"p/a": mask}, "dihedral")
    drawn = bank.draw("p/a", 64, torch.Generator().manual_seed(0))
    assert all(int(d.sum()) == 6 and _box(d) in {(3, 2), (2, 3)} for d in drawn)
    tops = {tuple(d[0].nonzero()[0].tolist()) for d in drawn}
    assert len(tops) > 16  # spread over the image, not parked in the corner


def test_grid_outlines_leave_a_one_pixel_defect_visible(tmp_path):
    """save_grid draws mask outlines at the grid's resolution, outside the mask: a 1-px dark
    line (a crack at 32 px) keeps its colour inside the red outline."""
    from PIL import Image

    from apo_fast.sampling.images import save_grid

    img = torch.ones(1, 3, 8, 8) * 0.5
    img[0, :, 4, :] = -1.0  # a dark horizontal line, one pixel high
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 4, :] = 1.0
    path = tmp_path / "grid.png"
    save_grid({"crack": img}, path, scale=3, outlines={"crack": mask})
    px = torch.tensor(np.array(Image.open(path).convert("RGB"))).int()
    label_w = 8 + 7 * len("crack")
    tile = px[:24, label_w:label_w + 24]
    assert (tile[12:15, :, :] == 0).all()  # the line, 3 screen rows, still dark
    assert (tile[11, :, 0] == 255).all() and (tile[11, :, 1] == 0).all()  # red just above it
    assert (tile[15, :, 0] == 255).all() and (tile[15, :, 1] == 0).all()  # and just below
    assert (tile[5, 5] == torch.tensor([191, 191, 191])).all()  # the rest untouched
