"""DINOv3 ViT/16 encoders (Simeoni et al., 2025) on timm's ``vit_*_patch16_dinov3_qkvb`` modules.

Architecture (Meta's ``dinov3_vit{s,b,l}16``): a 16 x 16 patch embedding, a class token and 4
register ("storage") tokens, no absolute position embedding but axial RoPE on the patch tokens
(period base 100, coordinates of each axis normalised separately to [-1, 1]), LayerScale, LayerNorm
with eps 1e-5, and a qkv projection whose key bias is masked to zero. The modules are timm's, under
timm's names (``reg_token``, ``blocks.N.gamma_1``, ``blocks.N.attn.q_bias`` / ``v_bias``); Meta's
published files (``storage_tokens``, ``ls1.gamma``, ``attn.qkv.bias`` + ``bias_mask``) are mapped
onto them by :func:`sclseg.models.weights.dinov3_from_meta`.

The RoPE coordinates are the same in training and evaluation: Meta's pre-training rescales them
at random (``pos_embed_rope_rescale_coords=2``), which fine-tuning here does not.
"""

from __future__ import annotations

from collections.abc import Sequence

import timm
import torch
from torch import Tensor, nn

__all__ = ["DINOV3_SIZES", "DINOv3Encoder", "DINOV3_PATCH_SIZE", "REGISTER_TOKENS"]

DINOV3_PATCH_SIZE = 16
#: Meta's "storage" tokens, after the class token and before the patch tokens.
REGISTER_TOKENS = 4

#: size -> (timm architecture, embedding width, depth, blocks whose outputs the DPT head reads)
DINOV3_SIZES: dict[str, tuple[str, int, int, tuple[int, ...]]] = {
    "small": ("vit_small_patch16_dinov3_qkvb", 384, 12, (2, 5, 8, 11)),
    "base": ("vit_base_patch16_dinov3_qkvb", 768, 12, (2, 5, 8, 11)),
    "large": ("vit_large_patch16_dinov3_qkvb", 1024, 24, (4, 11, 17, 23)),
}


class DINOv3Encoder(nn.Module):
    """DINOv3 ViT-S/B/L with patch 16: images ``(B, 3, 16h, 16w)`` -> patch tokens of chosen blocks.

    ``forward`` returns one ``(B, h*w, D)`` tensor per block of ``layers`` (row-major patch order),
    each through the final LayerNorm, the class token and the 4 register tokens dropped: Meta's
    ``get_intermediate_layers(x, n=layers, norm=True)``.
    """

    patch_size = DINOV3_PATCH_SIZE

    def __init__(self, size: str = "base") -> None:
        super().__init__()
        if size not in DINOV3_SIZES:
            raise ValueError(f"DINOv3 size '{size}' is unknown; available: {', '.join(DINOV3_SIZES)}")
        arch, dim, depth, layers = DINOV3_SIZES[size]
        vit = timm.create_model(arch, pretrained=False, num_classes=0, dynamic_img_size=True)
        self.cls_token = vit.cls_token
        self.reg_token = vit.reg_token
        self.patch_embed = vit.patch_embed
        self.rope = vit.rope
        self.blocks = vit.blocks
        self.norm = vit.norm
        self.embed_dim = dim
        self.layers: tuple[int, ...] = layers
        if len(self.blocks) != depth or self.reg_token.shape[1] != REGISTER_TOKENS:
            raise RuntimeError(f"timm's {arch} has {len(self.blocks)} blocks and {self.reg_token.shape[1]} registers, "
                               f"expected {depth} and {REGISTER_TOKENS}")

    def forward(self, images: Tensor, layers: Sequence[int] | None = None) -> list[Tensor]:
        height, width = images.shape[-2:]
        patch = self.patch_size
        if height % patch or width % patch:
            raise ValueError(f"DINOv3 input {height}x{width} is not a multiple of the patch size {patch}")
        wanted = self.layers if layers is None else tuple(layers)
        patches = self.patch_embed.proj(images).flatten(2).transpose(1, 2)  # (B, h*w, D)
        batch = patches.shape[0]
        x = torch.cat([self.cls_token.expand(batch, -1, -1), self.reg_token.expand(batch, -1, -1), patches], dim=1)
        rope = self.rope.get_embed(shape=[height // patch, width // patch])  # (h*w, 2 * head dim): sin, cos
        prefix = 1 + REGISTER_TOKENS
        outputs = []
        for index, block in enumerate(self.blocks):
            x = block(x, rope=rope)
            if index in wanted:
                outputs.append(self.norm(x[:, prefix:]))
        return outputs
