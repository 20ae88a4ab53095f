"""Small Vision Transformers with SOFT or softmax attention, for 32x32 single-channel images.

The layout follows timm's ``VisionTransformer`` (Dosovitskiy et al., "An Image is Worth 16x16 Words",
ICLR 2021): a patch-embedding convolution, a learned position embedding, pre-norm blocks of attention and
MLP, a final LayerNorm, mean pooling over tokens and a linear head. Only the attention differs between
variants: SOFT (Lu et al., NeurIPS 2021; see :mod:`model_zoo.soft`), its SOFT-Norm form, or softmax.
Mean pooling rather than a class token keeps every token on the grid that SOFT's landmark
convolution and depthwise V convolution need.
"""

from __future__ import annotations

import torch
from torch import nn

from model_zoo._registry import register_model
from model_zoo.soft import SoftAttention, SoftmaxAttention

__all__ = [
    "VisionTransformer",
    "vit_soft_norm_tiny",
    "vit_soft_tiny",
    "vit_soft_wide",
    "vit_softmax_tiny",
    "vit_softmax_wide",
]

_ATTN_TYPES = ("soft", "soft_norm", "softmax")


class Mlp(nn.Module):
    """Two-layer feed-forward block with GELU."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        attn_type: str,
        landmark_ratio: int,
        newton_iters: int,
        drop: float,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        if attn_type == "softmax":
            self.attn = SoftmaxAttention(dim, num_heads, proj_drop=drop)
        else:
            self.attn = SoftAttention(
                dim,
                num_heads,
                landmark_ratio=landmark_ratio,
                newton_iters=newton_iters,
                sym_norm=attn_type == "soft_norm",
                proj_drop=drop,
            )
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), H, W)
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier with a selectable attention.

    Args:
        img_size: input height and width.
        patch_size: patch side; the token grid is ``img_size // patch_size`` squared.
        in_chans: input channels.
        num_classes: classes; 0 makes the head an identity (``forward`` then returns pre-logits).
        embed_dim: token width.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        attn_type: one of ``"soft"``, ``"soft_norm"``, ``"softmax"``.
        landmark_ratio: SOFT landmark convolution kernel/stride (unused by softmax).
        newton_iters: SOFT Newton-Raphson steps (unused by softmax).
        drop_rate: dropout in blocks and before the head.
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 4,
        in_chans: int = 1,
        num_classes: int = 10,
        embed_dim: int = 64,
        depth: int = 4,
        num_heads: int = 2,
        mlp_ratio: float = 2.0,
        attn_type: str = "soft",
        landmark_ratio: int = 2,
        newton_iters: int = 20,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if attn_type not in _ATTN_TYPES:
            raise ValueError(f"unknown attn_type {attn_type!r}; valid: {list(_ATTN_TYPES)}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not divisible by patch_size {patch_size}")
        self.img_size = img_size
        self.in_chans = in_chans
        self.grid_size = img_size // patch_size
        self.num_features = embed_dim
        self.patch_embed = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2, embed_dim))
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, attn_type, landmark_ratio, newton_iters, drop_rate)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        # timm's ViT init: truncated normal (std 0.02) for position embedding and linear weights.
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Images ``(B, in_chans, img_size, img_size)`` -> pooled, normalised pre-logits ``(B, D)``."""
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"expected input (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        x = self.patch_embed(x)
        H, W = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2) + self.pos_embed
        for blk in self.blocks:
            x = blk(x, H, W)
        return self.norm(x).mean(1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features ``(B, D)`` -> logits ``(B, num_classes)``, or the features if ``pre_logits``."""
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def vit_soft_tiny(
    img_size: int = 32,
    in_chans: int = 1,
    patch_size: int = 4,
    num_classes: int = 10,
    embed_dim: int = 64,
    depth: int = 4,
    num_heads: int = 2,
    mlp_ratio: float = 2.0,
    drop_rate: float = 0.0,
    landmark_ratio: int = 2,
    newton_iters: int = 20,
) -> VisionTransformer:
    """SOFT ViT: 8x8 tokens, 4x4 landmarks at the defaults."""
    return VisionTransformer(
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio,
        attn_type="soft", landmark_ratio=landmark_ratio, newton_iters=newton_iters, drop_rate=drop_rate,
    )  # fmt: skip


@register_model
def vit_soft_norm_tiny(
    img_size: int = 32,
    in_chans: int = 1,
    patch_size: int = 4,
    num_classes: int = 10,
    embed_dim: int = 64,
    depth: int = 4,
    num_heads: int = 2,
    mlp_ratio: float = 2.0,
    drop_rate: float = 0.0,
    landmark_ratio: int = 2,
    newton_iters: int = 20,
) -> VisionTransformer:
    """SOFT-Norm ViT (symmetric ``D^-1/2 pinv D^-1/2`` normalisation); otherwise as ``vit_soft_tiny``."""
    return VisionTransformer(
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio,
        attn_type="soft_norm", landmark_ratio=landmark_ratio, newton_iters=newton_iters, drop_rate=drop_rate,
    )  # fmt: skip


@register_model
def vit_softmax_tiny(
    img_size: int = 32,
    in_chans: int = 1,
    patch_size: int = 4,
    num_classes: int = 10,
    embed_dim: int = 64,
    depth: int = 4,
    num_heads: int = 2,
    mlp_ratio: float = 2.0,
    drop_rate: float = 0.0,
) -> VisionTransformer:
    """Softmax-attention baseline with the same blocks as ``vit_soft_tiny``."""
    return VisionTransformer(
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio,
        attn_type="softmax", drop_rate=drop_rate,
    )  # fmt: skip


# The wide variants: 192-wide tokens (DeiT-Tiny's width, Touvron et al. 2021) with 3 heads of 64 and a 4x MLP,
# so that at batch 32 the linear layers (qkv, proj, fc1, fc2: 12 d^2 multiply-adds per token and block) are
# most of the work, rather than the per-op overheads and attention arithmetic of the 64-wide models. They are
# what int8 static quantization is measured on (BENCHMARKS.md, "kiln bench vit"); depth 3 keeps a digits run
# of their recipes to a few minutes on two cores.


@register_model
def vit_softmax_wide(
    img_size: int = 32,
    in_chans: int = 1,
    patch_size: int = 4,
    num_classes: int = 10,
    embed_dim: int = 192,
    depth: int = 3,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    drop_rate: float = 0.0,
) -> VisionTransformer:
    """Softmax ViT, 192 wide: 8x8 tokens, 3 heads, 4x MLP; GEMM-dominated at serving batch sizes."""
    return VisionTransformer(
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio,
        attn_type="softmax", drop_rate=drop_rate,
    )  # fmt: skip


@register_model
def vit_soft_wide(
    img_size: int = 32,
    in_chans: int = 1,
    patch_size: int = 4,
    num_classes: int = 10,
    embed_dim: int = 192,
    depth: int = 3,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    drop_rate: float = 0.0,
    landmark_ratio: int = 2,
    newton_iters: int = 20,
) -> VisionTransformer:
    """SOFT ViT, 192 wide, otherwise as ``vit_softmax_wide``: 8x8 tokens, 4x4 landmarks."""
    return VisionTransformer(
        img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio,
        attn_type="soft", landmark_ratio=landmark_ratio, newton_iters=newton_iters, drop_rate=drop_rate,
    )  # fmt: skip
