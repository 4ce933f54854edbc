"""SegFormer (Xie et al., NeurIPS 2021): the Mix Transformer (MiT) encoder and the all-MLP decode head.

Written here because timm has no MiT (its ``pvt_v2`` differs: other MLP ratios, no MiT weights). The layers follow
the NVlabs reference: overlapping patch embedding (7x7/s4 then 3x3/s2 convs + LayerNorm), efficient self-attention
whose keys/values are spatially reduced by a strided conv (ratios 8/4/2/1), Mix-FFN (Linear, 3x3 depthwise conv,
GELU, Linear), a LayerNorm after each stage, and a decode head that projects every stage to ``decoder_dim`` with a
Linear, upsamples to 1/4, concatenates (deepest first), fuses with a 1x1 conv + BN + ReLU and classifies.

Choices where the references differ: LayerNorm eps inside blocks and after stages is 1e-6 as in NVlabs/mmseg
(``ln_eps``; HuggingFace uses PyTorch's 1e-5 there, so checkpoints imported from HF record ``ln_eps=1e-5``) and 1e-5
in the patch embedding and the spatial-reduction norm (all references); q, k and v are separate Linears (HF
layout; NVlabs' fused ``kv`` is split on import); drop-path 0.1 as in the SegFormer configs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from segkd.models.base import FeatureSpec, SegModel, SegOutput


@dataclass(frozen=True)
class MiTConfig:
    dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    decoder_dim: int
    heads: tuple[int, int, int, int] = (1, 2, 5, 8)
    sr_ratios: tuple[int, int, int, int] = (8, 4, 2, 1)
    mlp_ratio: int = 4


MIT_CONFIGS: dict[str, MiTConfig] = {
    "b0": MiTConfig((32, 64, 160, 256), (2, 2, 2, 2), 256),
    "b1": MiTConfig((64, 128, 320, 512), (2, 2, 2, 2), 256),
    "b2": MiTConfig((64, 128, 320, 512), (3, 4, 6, 3), 768),
    "b3": MiTConfig((64, 128, 320, 512), (3, 4, 18, 3), 768),
    "b4": MiTConfig((64, 128, 320, 512), (3, 8, 27, 3), 768),
    "b5": MiTConfig((64, 128, 320, 512), (3, 6, 40, 3), 768),
}


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows, then LayerNorm over channels. Returns tokens and the grid size."""

    def __init__(self, in_chans: int, dim: int, patch: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=stride, padding=patch // 2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor) -> tuple[Tensor, int, int]:
        x = self.proj(x)
        h, w = x.shape[-2:]
        return self.norm(x.flatten(2).transpose(1, 2)), h, w


class EfficientAttention(nn.Module):
    """Multi-head self-attention whose keys and values come from a map reduced ``sr_ratio`` times per side."""

    fused_attn = True  # F.scaled_dot_product_attention; the bench's FLOP counter adds its formula explicitly

    def __init__(self, dim: int, heads: int, sr_ratio: int) -> None:
        super().__init__()
        self.heads = heads
        self.scale = (dim // heads) ** -0.5
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.sr_ratio = sr_ratio
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.sr_norm = nn.LayerNorm(dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        b, n, c = x.shape
        kv = x
        if self.sr_ratio > 1:
            kv = x.transpose(1, 2).reshape(b, c, h, w)
            kv = self.sr_norm(self.sr(kv).flatten(2).transpose(1, 2))
        q = self.q(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        k = self.k(kv).reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)
        v = self.v(kv).reshape(b, -1, self.heads, c // self.heads).transpose(1, 2)
        if self.fused_attn:
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            out = attn.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MixFFN(nn.Module):
    """Linear -> 3x3 depthwise conv (positional information without position embeddings) -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = self.fc1(x)
        b, n, c = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(b, c, h, w)).flatten(2).transpose(1, 2)
        return self.fc2(self.act(x))


class MiTBlock(nn.Module):
    def __init__(
        self, dim: int, heads: int, sr_ratio: int, mlp_ratio: int, drop_path: float, ln_eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=ln_eps)
        self.attn = EfficientAttention(dim, heads, sr_ratio)
        self.norm2 = nn.LayerNorm(dim, eps=ln_eps)
        self.mlp = MixFFN(dim, dim * mlp_ratio)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, h: int, w: int) -> Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), h, w))
        return x + self.drop_path(self.mlp(self.norm2(x), h, w))


class MiT(nn.Module):
    """Mix Transformer encoder: four stages at strides 4, 8, 16, 32."""

    def __init__(
        self, cfg: MiTConfig, in_chans: int = 3, drop_path_rate: float = 0.1, ln_eps: float = 1e-6
    ) -> None:
        super().__init__()
        self.cfg = cfg
        rates = torch.linspace(0, drop_path_rate, sum(cfg.depths)).tolist()
        self.patch_embeds = nn.ModuleList()
        self.stages = nn.ModuleList()
        self.norms = nn.ModuleList()
        prev, k = in_chans, 0
        for i, (dim, depth) in enumerate(zip(cfg.dims, cfg.depths, strict=True)):
            patch, stride = (7, 4) if i == 0 else (3, 2)
            self.patch_embeds.append(OverlapPatchEmbed(prev, dim, patch, stride))
            self.stages.append(
                nn.ModuleList(
                    MiTBlock(dim, cfg.heads[i], cfg.sr_ratios[i], cfg.mlp_ratio, rates[k + j], ln_eps)
                    for j in range(depth)
                )
            )
            self.norms.append(nn.LayerNorm(dim, eps=ln_eps))
            prev, k = dim, k + depth
        self.apply(_init_weights)

    def forward(self, x: Tensor, taps: bool = False) -> tuple[list[Tensor], list[Tensor]]:
        """Stage outputs (B x C x h x w) and, when ``taps``, the patch embeddings as maps."""
        feats: list[Tensor] = []
        embeds: list[Tensor] = []
        b = x.shape[0]
        for embed, blocks, norm in zip(self.patch_embeds, self.stages, self.norms, strict=True):
            x, h, w = embed(x)
            if taps:
                embeds.append(x.transpose(1, 2).reshape(b, -1, h, w))
            for blk in blocks:
                x = blk(x, h, w)
            x = norm(x).transpose(1, 2).reshape(b, -1, h, w)
            feats.append(x)
        return feats, embeds


def _init_weights(m: nn.Module) -> None:
    """NVlabs initialisation: trunc-normal(0.02) Linears, fan-out normal convs, unit LayerNorms."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0.0, (2.0 / fan_out) ** 0.5)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class AllMLPHead(nn.Module):
    """SegFormer's decode head. ``linear_c[i]`` projects stage ``i``; concatenation order is stage 4 .. stage 1."""

    def __init__(self, dims: tuple[int, ...], decoder_dim: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.linear_c = nn.ModuleList(nn.Linear(d, decoder_dim) for d in dims)
        self.linear_fuse = nn.Conv2d(decoder_dim * len(dims), decoder_dim, 1, bias=False)
        self.bn = nn.BatchNorm2d(decoder_dim)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Conv2d(decoder_dim, num_classes, 1)

    def forward(self, feats: list[Tensor]) -> Tensor:
        size = feats[0].shape[-2:]
        outs = []
        for feat, linear in zip(feats, self.linear_c, strict=True):
            b, _, h, w = feat.shape
            y = linear(feat.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, -1, h, w)
            if (h, w) != tuple(size):
                y = F.interpolate(y, size=size, mode="bilinear", align_corners=False)
            outs.append(y)
        x = self.linear_fuse(torch.cat(outs[::-1], dim=1))
        x = F.relu(self.bn(x))
        return self.classifier(self.dropout(x))


class SegFormer(SegModel):
    family = "transformer"
    output_stride = 4

    def __init__(
        self, name: str, variant: str, num_classes: int, drop_path_rate: float = 0.1, ln_eps: float = 1e-6
    ) -> None:
        super().__init__(name, num_classes)
        cfg = MIT_CONFIGS[variant]
        self.variant = variant
        self.encoder = MiT(cfg, drop_path_rate=drop_path_rate, ln_eps=ln_eps)
        self.decode_head = AllMLPHead(cfg.dims, cfg.decoder_dim, num_classes)
        strides = (4, 8, 16, 32)
        self.feature_info = [FeatureSpec(f"stage{i + 1}", d, s) for i, (d, s) in enumerate(zip(cfg.dims, strides))]
        self.feature_info += [
            FeatureSpec(f"embed{i + 1}", d, s, "embed") for i, (d, s) in enumerate(zip(cfg.dims, strides))
        ]

    def forward(self, x: Tensor, taps: bool = False) -> Tensor | SegOutput:
        feats, embeds = self.encoder(x, taps)
        logits = self.decode_head(feats)
        if not taps:
            return logits
        return SegOutput(
            logits,
            {f"stage{i + 1}": f for i, f in enumerate(feats)},
            {f"embed{i + 1}": e for i, e in enumerate(embeds)},
        )

    def classifier_parameters(self) -> list[nn.Parameter]:
        return list(self.decode_head.parameters())
