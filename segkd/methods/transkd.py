"""TransKD (Liu et al., "TransKD: Transformer Knowledge Distillation for Efficient Semantic Segmentation").

Transformer teacher -> transformer student, all four stages (any MiT pair: the stage strides match, channels may
differ). Objective (official ``train_TransKD*.py``)::

    L = CE(zS, y) + 1.0 * HCL(CSF(F^S_1..4), F^T_1..4) + sum_i w_i MSE(PEA_i(e^S_i), e^T_i),  w = (0.1, 0.1, 0.5, 1)

* CSF (cross selective fusion, Knowledge Review's ABF with SKNet channel attention): deepest stage first; each
  stage ``u = BN(Conv1x1(C_s -> 64))``; below the deepest, fuse with the nearest-upsampled 64-ch residual from
  the stage above: ``s = GAP(u + r)``, ``z = ReLU(BN(Conv1x1(64 -> 32)(s)))`` -- at batch 1 the BN is skipped
  (BN cannot normalise one value per channel; the official code switches to a BN-free ``fc1``). Choice: the two
  paths share the conv weights (the official code has two separate convs, so its batch-1 conv never sees the
  batch>1 updates). Two ``Conv1x1(32 -> 64)`` give per-channel logits, softmaxed across the two branches:
  ``u = a0 u + a1 r``; output ``BN(Conv3x3(64 -> C_t))``. Kaiming-uniform (a=1) init of conv1/conv2.
* HCL: per stage ``MSE(fs, ft)`` plus pyramid terms on adaptive-avg-pooled 4x4, 2x2, 1x1 maps (only levels
  smaller than the map height), weights halving per level used (1/2, 1/4, 1/8), divided by the weight sum.
* PEA: per stage ``Linear(C_s -> C_t)`` on the patch-embedding tokens (the OverlapPatchEmbed output, before the
  blocks), ``nn.MSELoss()`` mean against the teacher's tokens, weighted by ``embed_weights``; ``embed=0`` uses
  all stages, ``embed=k`` only stage k (the official ``--embed`` ablation, whose "all" value is 5).
* ``variant="gl"``: GL-Mixer on the stage-4 student embedding before its PEA Linear: ``a * MHSA(e) + b * GLU(e)``
  (8 heads, qkv without bias; GLU = Conv1d(k3) * sigmoid(Conv1d(k3)) along the token sequence). The official
  scalars are uninitialised memory; segkd initialises ``a = b = gl_init`` (0.5: the mix starts as the average of
  the two paths, keeping the output at the scale of either).
* ``variant="ea"``: Embedding Assistant: per stage an extra patch embedding (Conv k7/s4 on the image for stage 1,
  k3/s2 on the student's previous stage output otherwise, then LayerNorm) straight to the teacher's channels;
  ``e_i = lambda_i PEA_i(e^S_i) + mu_i EA_i(prev_i)``, learnable scalars initialised lambda = (0.1, 0.2, 0.3,
  0.4), mu = (0.5, 0.6, 0.7, 0.8) as published.
* CE: plain unweighted pixel CE at the label size (the official code uses ERFNet's Cityscapes class weights
  and 1/4-resolution labels; segkd uses the same CE as every other method so rows are comparable).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from segkd.engine.losses import seg_cross_entropy
from segkd.errors import SegkdError
from segkd.methods.base import Method, check_positive, register_method
from segkd.models import SegModel, SegOutput

STAGES = 4


def hcl_loss(fs: list[Tensor], ft: list[Tensor]) -> Tensor:
    """Knowledge Review's hierarchical context loss, summed over stages."""
    total = fs[0].new_zeros((), dtype=torch.float32)
    for s, t in zip(fs, ft, strict=True):
        s, t = s.float(), t.float()
        h = s.shape[2]
        loss = F.mse_loss(s, t)
        cnt, tot = 1.0, 1.0
        for level in (4, 2, 1):
            if level >= h:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(F.adaptive_avg_pool2d(s, level), F.adaptive_avg_pool2d(t, level)) * cnt
            tot += cnt
        total = total + loss / tot
    return total


def pea_loss(es: list[Tensor | None], et: list[Tensor], weights: tuple[float, ...]) -> Tensor:
    """``sum_i w_i * MSE(es_i, et_i)`` over the stages whose student embedding is given (``B x N x C`` tokens)."""
    total = et[0].new_zeros((), dtype=torch.float32)
    for s, t, w in zip(es, et, weights, strict=True):
        if s is not None:
            total = total + w * F.mse_loss(s.float(), t.float())
    return total


def tokens(x: Tensor) -> Tensor:
    """``B x C x h x w`` map -> ``B x (h*w) x C`` tokens."""
    return x.flatten(2).transpose(1, 2)


class SK(nn.Module):
    """SKNet-style selection between the stage feature and the upsampled residual, per channel."""

    def __init__(self, mid: int) -> None:
        super().__init__()
        d = max(mid // 16, 32)
        self.fc = nn.Conv2d(mid, d, 1, bias=False)
        self.fc_bn = nn.BatchNorm2d(d)
        self.fcs = nn.ModuleList([nn.Conv2d(d, mid, 1), nn.Conv2d(d, mid, 1)])

    def forward(self, u: Tensor, r: Tensor) -> Tensor:
        s = F.adaptive_avg_pool2d(u + r, 1)
        z = self.fc(s)
        if z.shape[0] > 1 or not self.training:
            z = self.fc_bn(z)
        z = F.relu(z)
        a = torch.softmax(torch.stack([fc(z) for fc in self.fcs], dim=0), dim=0)
        return a[0] * u + a[1] * r


class CSFStage(nn.Module):
    def __init__(self, cin: int, mid: int, cout: int, fuse: bool) -> None:
        super().__init__()
        self.conv1 = nn.Sequential(nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid))
        self.conv2 = nn.Sequential(nn.Conv2d(mid, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout))
        self.sk = SK(mid) if fuse else None
        nn.init.kaiming_uniform_(self.conv1[0].weight, a=1)
        nn.init.kaiming_uniform_(self.conv2[0].weight, a=1)

    def forward(self, x: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
        u = self.conv1(x)
        if self.sk is not None and residual is not None:
            r = F.interpolate(residual, size=u.shape[-2:], mode="nearest")
            u = self.sk(u, r)
        return self.conv2(u), u


class CSF(nn.Module):
    """Cross selective fusion: student stage features -> teacher channels, deepest stage first."""

    def __init__(self, in_channels: list[int], out_channels: list[int], mid: int = 64) -> None:
        super().__init__()
        n = len(in_channels)
        self.stages = nn.ModuleList(CSFStage(ci, mid, co, fuse=i < n - 1)
                                    for i, (ci, co) in enumerate(zip(in_channels, out_channels, strict=True)))

    def forward(self, feats: list[Tensor]) -> list[Tensor]:
        outs: list[Tensor] = [feats[0]] * len(feats)
        residual = None
        for i in reversed(range(len(feats))):
            outs[i], residual = self.stages[i](feats[i], residual)
        return outs


class GLMixer(nn.Module):
    """Global (MHSA) + local (GLU conv along the token sequence) mixing of the stage-4 embedding tokens."""

    def __init__(self, dim: int, heads: int = 8, init: float = 0.5, add: bool = False) -> None:
        super().__init__()
        while dim % heads:
            heads //= 2
        self.heads, self.add = heads, add
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.conv_a = nn.Conv1d(dim, dim, 3, padding=1)
        self.conv_g = nn.Conv1d(dim, dim, 3, padding=1)
        self.atten_weight = nn.Parameter(torch.tensor([float(init)]))
        self.conv_weight = nn.Parameter(torch.tensor([float(init)]))

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        glob = self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))
        seq = x.transpose(1, 2)
        local = (self.conv_a(seq) * torch.sigmoid(self.conv_g(seq))).transpose(1, 2)
        out = self.atten_weight * glob + self.conv_weight * local
        return out + x if self.add else out


class PatchEmbedEA(nn.Module):
    """An assistant overlapping patch embedding (conv + LayerNorm) into the teacher's channels."""

    def __init__(self, cin: int, cout: int, patch: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(cin, cout, patch, stride, patch // 2)
        self.norm = nn.LayerNorm(cout)
        fan_out = patch * patch * cout
        nn.init.normal_(self.proj.weight, 0.0, (2.0 / fan_out) ** 0.5)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(tokens(self.proj(x)))


@dataclass
class TransKDOptions:
    variant: Literal["base", "gl", "ea"] = field(default="base", metadata={
        "flag": "--variant", "help": "base, gl (GL-Mixer) or ea (Embedding Assistant)."})
    feat_weight: float = 1.0
    embed_weights: tuple[float, ...] = (0.1, 0.1, 0.5, 1.0)
    embed: int = 0
    csf_mid: int = 64
    gl_init: float = 0.5
    gl_add: bool = False
    ea_lambda: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4)
    ea_mu: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8)
    ce_weight: float = 1.0

    def check(self) -> None:
        check_positive(self, "feat_weight", "ce_weight")
        for name in ("embed_weights", "ea_lambda", "ea_mu"):
            if len(getattr(self, name)) != STAGES:
                raise SegkdError(f"option {name} needs {STAGES} values, got {len(getattr(self, name))}")
        if any(w < 0 for w in self.embed_weights):
            raise SegkdError(f"option embed_weights must be >= 0, got {self.embed_weights}")
        if not 0 <= self.embed <= STAGES:
            raise SegkdError(f"option embed must be 0 (all stages) or a stage 1..{STAGES}, got {self.embed}")
        if self.csf_mid < 1:
            raise SegkdError(f"option csf_mid must be >= 1, got {self.csf_mid}")


def _stage_channels(model: SegModel, kind: str) -> list[int]:
    return [model.feature_spec(f"{kind}{i + 1}").channels for i in range(STAGES)]


def _pair_check(student: SegModel, teacher: SegModel) -> str | None:
    for i in range(STAGES):
        for kind in ("stage", "embed"):
            ss, ts = student.feature_spec(f"{kind}{i + 1}").stride, teacher.feature_spec(f"{kind}{i + 1}").stride
            if ss != ts:
                return (f"{kind}{i + 1} has stride {ss} on the student but {ts} on the teacher; TransKD needs "
                        "stage-aligned hierarchical transformers")
    return None


class TransKD(Method):
    def __init__(self, opts: TransKDOptions, student: SegModel, teacher: SegModel, ignore_index: int = 255) -> None:
        super().__init__(opts, ignore_index)
        cs, ct = _stage_channels(student, "stage"), _stage_channels(teacher, "stage")
        es, et = _stage_channels(student, "embed"), _stage_channels(teacher, "embed")
        self.csf = CSF(cs, ct, opts.csf_mid)
        self.stages_used = [i for i in range(STAGES) if opts.embed in (0, i + 1)]
        self.pea = nn.ModuleDict({str(i): nn.Linear(es[i], et[i]) for i in self.stages_used})
        if opts.variant == "gl" and 3 in self.stages_used:
            self.gl = GLMixer(es[3], init=opts.gl_init, add=opts.gl_add)
        if opts.variant == "ea":
            ins = [3] + cs[:-1]
            self.ea = nn.ModuleDict({str(i): PatchEmbedEA(ins[i], et[i], 7 if i == 0 else 3, 4 if i == 0 else 2)
                                     for i in self.stages_used})
            self.ea_lambda = nn.Parameter(torch.tensor(opts.ea_lambda, dtype=torch.float32))
            self.ea_mu = nn.Parameter(torch.tensor(opts.ea_mu, dtype=torch.float32))

    def forward(self, images: Tensor, labels: Tensor, outs: dict[str, SegOutput],
                kd_labels: Tensor | None = None) -> dict[str, Tensor]:
        o = self.opts
        s_out, t_out = outs["student"], outs["teacher"]
        fs = [s_out.tap(f"stage{i + 1}") for i in range(STAGES)]
        ft = [t_out.tap(f"stage{i + 1}").detach() for i in range(STAGES)]
        es_list: list[Tensor | None] = [None] * STAGES
        for i in self.stages_used:
            e = tokens(s_out.tap(f"embed{i + 1}"))
            if i == 3 and hasattr(self, "gl"):
                e = self.gl(e)
            e = self.pea[str(i)](e)
            if o.variant == "ea":
                prev = images if i == 0 else fs[i - 1]
                e = self.ea_lambda[i] * e + self.ea_mu[i] * self.ea[str(i)](prev)
            es_list[i] = e
        et = [tokens(t_out.tap(f"embed{i + 1}")).detach() for i in range(STAGES)]
        return self.record({
            "ce": (o.ce_weight, seg_cross_entropy(s_out.logits, labels, self.ignore_index)),
            "hcl": (o.feat_weight, hcl_loss(self.csf(fs), ft)),
            "pea": (1.0, pea_loss(es_list, et, o.embed_weights)),
        })


_TAPS = tuple(f"embed{i + 1}" for i in range(STAGES)) + tuple(f"stage{i + 1}" for i in range(STAGES))


@register_method("transkd", "transformer -> transformer: CSF + HCL on 4 stages, PEA on patch embeddings "
                 "(+GL-Mixer / EA)", TransKDOptions, taps={"student": _TAPS, "teacher": _TAPS}, same_classes=False,
                 pair_check=_pair_check,
                 # the CSF idles at feat_weight 0, the student's head at ce_weight 0, the SK's BatchNorm at batch 1
                 unused_params=lambda o, b: o.feat_weight == 0 or o.ce_weight == 0 or b == 1,
                 cache_refusal="its PEA/CSF terms compare the teacher's patch embeddings and stage tokens, which "
                               "depend on the crop through global attention; run it with the teacher online")
def _build(opts: TransKDOptions, student: SegModel, teacher: SegModel, ignore_index: int = 255) -> TransKD:
    return TransKD(opts, student, teacher, ignore_index)
