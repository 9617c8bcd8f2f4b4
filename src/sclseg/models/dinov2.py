"""DINOv2 ViT/14 encoders (Oquab et al., 2023) on timm's blocks, with Meta's parameter names.

The encoder's ``state_dict`` has exactly the keys of Meta's ``dinov2_vit{s,b,l}14_pretrain.pth``
(``cls_token``, ``pos_embed``, ``mask_token``, ``patch_embed.proj.*``, ``blocks.N.*``, ``norm.*``),
so those files load with ``strict=True``. The transformer blocks are timm's
``vit_*_patch14_dinov2`` blocks (the same tensors under the same names); the position embedding is
resized as Meta's ``interpolate_pos_encoding`` resizes it (:func:`interpolate_pos_embed`), which is
not what timm does, and which the logits depend on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DINOV2_SIZES", "DINOv2Encoder", "interpolate_pos_embed", "PATCH_SIZE"]

PATCH_SIZE = 14
#: Meta's models are trained at 518 x 518: a 37 x 37 grid of patch position embeddings.
PRETRAIN_GRID = 37
#: Meta's work-around offset added to the target grid before computing the scale factor.
INTERPOLATE_OFFSET = 0.1

#: True while ``torch.export`` traces (torch >= 2.6 tells; older versions trace the eager branch)
_exporting = getattr(torch.compiler, "is_exporting", lambda: False)

#: size -> (timm architecture, embedding width, depth, blocks whose outputs the DPT head reads)
DINOV2_SIZES: dict[str, tuple[str, int, int, tuple[int, ...]]] = {
    "small": ("vit_small_patch14_dinov2", 384, 12, (2, 5, 8, 11)),
    "base": ("vit_base_patch14_dinov2", 768, 12, (2, 5, 8, 11)),
    "large": ("vit_large_patch14_dinov2", 1024, 24, (4, 11, 17, 23)),
}


def interpolate_pos_embed(pos_embed: Tensor, grid_h: int, grid_w: int, offset: float = INTERPOLATE_OFFSET) -> Tensor:
    """DINOv2's position embedding for a ``grid_h x grid_w`` patch grid.

    ``pos_embed``: ``(1, 1 + M*M, D)`` (class token first). Returns ``(1, 1 + grid_h*grid_w, D)``
    in the dtype of ``pos_embed``. The ``M x M`` patch embeddings are resized bicubically
    (``align_corners=False``, no antialias, in float32) by the scale factors
    ``((grid_h + offset) / M, (grid_w + offset) / M)`` passed as such, so source coordinates are
    ``(dst + 0.5) * M / (grid + offset) - 0.5``, not ``... * M / grid``. The square ``M x M`` grid
    is returned unchanged.

    While ``torch.export`` traces the model (ONNX export) the same resize is written as two
    products with per-axis bicubic matrices (:func:`_traceable_pos_embed`), so that the grid stays
    a dynamic size of the exported graph; its values agree with this one to float32 rounding.
    """
    tokens = pos_embed.shape[1] - 1
    side = int(math.sqrt(tokens))
    if side * side != tokens:
        raise ValueError(f"pos_embed holds {tokens} patch embeddings, not a square grid")
    if _exporting():
        return _traceable_pos_embed(pos_embed, side, grid_h, grid_w, offset)
    if grid_h == side and grid_w == side:
        return pos_embed
    dim = pos_embed.shape[-1]
    table = pos_embed.float()
    grid = table[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2)
    scale = ((grid_h + offset) / side, (grid_w + offset) / side)
    resized = F.interpolate(grid, scale_factor=scale, mode="bicubic", align_corners=False, antialias=False)
    if resized.shape[-2:] != (grid_h, grid_w):
        raise ValueError(f"position embedding resized to {tuple(resized.shape[-2:])}, expected {(grid_h, grid_w)}")
    patches = resized.permute(0, 2, 3, 1).reshape(1, grid_h * grid_w, dim)
    return torch.cat([table[:, :1], patches], dim=1).to(pos_embed.dtype)


def _cubic_taps(t: Tensor) -> Tensor:
    """Weights ``(n, 4)`` of the taps ``floor - 1 .. floor + 2`` for fractional offsets ``t`` ``(n,)``:
    PyTorch's bicubic convolution (Keys, a = -0.75)."""
    a = -0.75

    def near(x: Tensor) -> Tensor:  # 0 <= x <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: Tensor) -> Tensor:  # 1 <= x <= 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)


def _bicubic_rows(length: int, side: int, inverse_scale: Tensor) -> Tensor:
    """The ``(length, side)`` matrix of a bicubic resize along one axis (``align_corners=False``,
    borders clamped): output ``i`` reads source ``(i + 0.5) * inverse_scale - 0.5``."""
    device = inverse_scale.device
    source = (torch.arange(length, dtype=torch.float32, device=device) + 0.5) * inverse_scale - 0.5
    base = torch.floor(source)
    taps = (base.long()[:, None] + torch.arange(-1, 3, device=device)).clamp(0, side - 1)
    return torch.zeros(length, side, device=device).scatter_add(1, taps, _cubic_taps(source - base))


def _traceable_pos_embed(pos_embed: Tensor, side: int, grid_h: int, grid_w: int, offset: float) -> Tensor:
    """:func:`interpolate_pos_embed` for ``torch.export``: the grid sizes may be symbolic, and the
    kept-as-is case at ``side x side`` is a tensor ``where`` (scale 1 makes both matrices the
    identity) instead of a Python branch the trace would fix."""
    dim = pos_embed.shape[-1]
    table = pos_embed.float()
    height = torch.scalar_tensor(grid_h, dtype=torch.float32, device=pos_embed.device)
    width = torch.scalar_tensor(grid_w, dtype=torch.float32, device=pos_embed.device)
    kept = (height == side) & (width == side)
    one = torch.ones((), device=pos_embed.device)
    rows = _bicubic_rows(grid_h, side, torch.where(kept, one, side / (height + offset)))
    cols = _bicubic_rows(grid_w, side, torch.where(kept, one, side / (width + offset)))
    patches = torch.einsum("ys,std,xt->yxd", rows, table[0, 1:].reshape(side, side, dim), cols)
    return torch.cat([table[:, :1], patches.reshape(1, grid_h * grid_w, dim)], dim=1).to(pos_embed.dtype)


class DINOv2Encoder(nn.Module):
    """DINOv2 ViT-S/B/L with patch 14: images ``(B, 3, 14h, 14w)`` -> patch tokens of chosen blocks.

    ``forward`` returns one ``(B, h*w, D)`` tensor per block of ``layers`` (row-major patch
    order), each through the final LayerNorm, the class token dropped: Meta's
    ``get_intermediate_layers(x, layers, norm=True)``. ``mask_token`` is kept (frozen, unused by
    segmentation) so that the parameter set and the keys are Meta's.
    """

    patch_size = PATCH_SIZE

    def __init__(self, size: str = "base") -> None:
        super().__init__()
        if size not in DINOV2_SIZES:
            raise ValueError(f"DINOv2 size '{size}' is unknown; available: {', '.join(DINOV2_SIZES)}")
        arch, dim, depth, layers = DINOV2_SIZES[size]
        # init_values=1.0: Meta's LayerScale initialisation (the values come from the weights file)
        vit = timm.create_model(arch, pretrained=False, num_classes=0, img_size=PATCH_SIZE * PRETRAIN_GRID,
                                init_values=1.0)
        self.cls_token = vit.cls_token
        self.pos_embed = vit.pos_embed
        self.mask_token = nn.Parameter(torch.zeros(1, dim), requires_grad=False)
        self.patch_embed = vit.patch_embed
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.embed_dim = dim
        self.layers: tuple[int, ...] = layers
        if len(self.blocks) != depth:
            raise RuntimeError(f"timm's {arch} has {len(self.blocks)} blocks, expected {depth}")

    def forward(self, images: Tensor, layers: Sequence[int] | None = None) -> list[Tensor]:
        height, width = images.shape[-2:]
        if height % PATCH_SIZE or width % PATCH_SIZE:
            raise ValueError(f"DINOv2 input {height}x{width} is not a multiple of the patch size {PATCH_SIZE}")
        wanted = self.layers if layers is None else tuple(layers)
        patches = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, h*w, D)
        x = torch.cat([self.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
        x = x + interpolate_pos_embed(self.pos_embed, height // PATCH_SIZE, width // PATCH_SIZE).to(x.dtype)
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in wanted:
                outputs.append(self.norm(x)[:, 1:])
        return outputs
