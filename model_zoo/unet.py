"""Class-conditional UNet noise predictor for 16x16 single-channel images (the digits diffusion family).

The network is diffusers' ``UNet2DModel`` (the DDPM UNet of Ho et al., "Denoising Diffusion Probabilistic
Models", NeurIPS 2020, Appendix B): a sinusoidal timestep embedding and MLP, residual blocks with
GroupNorm and the time embedding added between their convolutions, self-attention at the lowest
resolution (the last down block, the middle block and the first up block), skip connections between
down and up paths. What is Kiln's:

* class conditioning for classifier-free guidance (Ho & Salimans, "Classifier-Free Diffusion Guidance",
  2022): ``num_classes + 1`` learned label embeddings added to the time embedding, the last one
  (index ``num_classes``) the *null* label that training substitutes for a share of the labels;
* ``forward(sample, timestep, label) -> noise``, a plain tensor, so the module exports to ONNX with three
  named inputs and one output;
* :class:`_SpatialSelfAttention`, the attention processor every attention layer uses. diffusers'
  default ``AttnProcessor2_0`` reshapes with Python sizes read off transposed views; traced from a
  batch-1 example (what ``export.onnx.export_onnx`` is usually given), torch.export's size-oblivious
  tracing then bakes a batch of 1 into the graph's Reshape nodes and onnxruntime fails on any other batch.
  The processor here computes the same attention (parity ~1e-6) from flatten/unflatten, which keeps the
  batch symbolic.

The UNet knows nothing of noise schedules or samplers (``model_zoo.schedulers``); the timestep is the
integer training step ``t`` in ``[0, num_train_timesteps)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from model_zoo._registry import register_model

if TYPE_CHECKING:
    from diffusers.models.attention_processor import Attention

__all__ = ["DigitsUNet", "unet_digits16"]


class _SpatialSelfAttention:
    """Multi-head self-attention over the pixels of ``(B, C, H, W)`` maps, for diffusers' ``Attention``.

    The same computation as diffusers' ``AttnProcessor2_0`` for the UNet's self-attention (GroupNorm,
    q/k/v projections, scaled dot-product attention, output projection, residual, rescale), written so that
    every reshape keeps the batch dimension symbolic under ``torch.export``.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,  # passed by diffusers' blocks; unused (no spatial norm)
    ) -> torch.Tensor:
        if encoder_hidden_states is not None or attention_mask is not None:
            raise ValueError("_SpatialSelfAttention is self-attention only (no context, no mask)")
        residual = hidden_states
        h, w = hidden_states.shape[-2:]
        x = hidden_states if attn.group_norm is None else attn.group_norm(hidden_states)
        x = x.flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = (
            proj(x).unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # (B, heads, HW, head_dim)
            for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        out = F.scaled_dot_product_attention(q, k, v, scale=attn.scale)
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))  # projection, dropout
        out = out.transpose(1, 2).unflatten(2, (h, w))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class DigitsUNet(nn.Module):
    """ε-prediction UNet with class conditioning and a null label for classifier-free guidance.

    Args:
        image_size: input height and width; must be divisible by ``2 ** (len(block_out_channels) - 1)``.
        in_channels: image channels (the predicted noise has the same).
        num_classes: real classes; label ``num_classes`` is the null (unconditional) label.
        block_out_channels: channels per resolution level; each level after the first halves the
            resolution, and the last level (plus the middle block) has self-attention.
        layers_per_block: residual blocks per down level (up levels have one more, as in diffusers).
        attention_head_dim: channels per attention head.
        norm_num_groups: GroupNorm groups; must divide every entry of ``block_out_channels``.
        dropout: dropout inside the residual blocks.
    """

    def __init__(
        self,
        image_size: int = 16,
        in_channels: int = 1,
        num_classes: int = 10,
        block_out_channels: tuple[int, ...] = (32, 64, 64),
        layers_per_block: int = 1,
        attention_head_dim: int = 32,
        norm_num_groups: int = 8,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        levels = len(block_out_channels)
        if levels < 1 or image_size % 2 ** (levels - 1):
            raise ValueError(
                f"image_size {image_size} is not divisible by 2 ** {levels - 1} "
                f"(one halving per level after the first of block_out_channels {list(block_out_channels)})"
            )
        if any(c % norm_num_groups for c in block_out_channels):
            raise ValueError(
                f"norm_num_groups {norm_num_groups} must divide every block_out_channels "
                f"{list(block_out_channels)}"
            )
        self.image_size = image_size
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.null_label = num_classes
        # diffusers is imported here, not at module level: importing it takes seconds, and `import
        # model_zoo` (every CLI command, every server start) should not pay that for the other families.
        from diffusers import UNet2DModel
        from diffusers.models.attention_processor import Attention

        self.unet = UNet2DModel(
            sample_size=image_size,
            in_channels=in_channels,
            out_channels=in_channels,
            down_block_types=("DownBlock2D",) * (levels - 1) + ("AttnDownBlock2D",),
            up_block_types=("AttnUpBlock2D",) + ("UpBlock2D",) * (levels - 1),
            block_out_channels=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
            num_class_embeds=num_classes + 1,  # + the null label
        )
        for module in self.unet.modules():
            if isinstance(module, Attention):
                module.set_processor(_SpatialSelfAttention())

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        """Predicted noise ε for noisy images ``sample`` (B, C, H, W) at integer steps ``timestep`` (B,)
        with class ``label`` (B,) in ``[0, num_classes]`` (``num_classes`` = unconditional)."""
        expected = (self.in_channels, self.image_size, self.image_size)
        if sample.dim() != 4 or tuple(sample.shape[1:]) != expected:
            raise ValueError(
                f"expected sample (B, {', '.join(map(str, expected))}), got {tuple(sample.shape)}"
            )
        return self.unet(sample, timestep, class_labels=label, return_dict=False)[0]


@register_model
def unet_digits16(
    image_size: int = 16,
    in_channels: int = 1,
    num_classes: int = 10,
    block_out_channels: tuple[int, ...] = (32, 64, 64),
    layers_per_block: int = 1,
    attention_head_dim: int = 32,
    norm_num_groups: int = 8,
    dropout: float = 0.0,
) -> DigitsUNet:
    """16x16 digits: levels at 16x16, 8x8 and 4x4 (attention at 4x4); about 1.1 M parameters."""
    return DigitsUNet(
        image_size, in_channels, num_classes, block_out_channels, layers_per_block, attention_head_dim,
        norm_num_groups, dropout,
    )  # fmt: skip
