"""BMD-GAN networks (Gu et al. 2023, seed ``004``): decomposition generator, multi-scale
conditional PatchGAN discriminators and the stage-3 regression network.

Reference: Gu Y, Otake Y, Uemura K, et al. *Bone mineral density estimation from a plain X-ray
image by learning decomposition into projections of bone-segmented computed tomography.* Medical
Image Analysis 90:102970 (2023), sections 3.2, 3.3 and 4.2.7.

What the paper states, and how this module realises it
------------------------------------------------------
* Generator ``G = {M_E, M_D}``: encoder backbone HRFormer-B, decoder "followed the upsampling parts
  of the GlobalGenerator in Pix2PixHD, consisting of several convolution layers and
  transpose-convolution layers".  "Batch Normalization and Instance Normalization [replaced] with
  Group Normalization".  "Our method is network-agnostic".
  **Lighter backbone (documented deviation):** HRFormer-B (~50 M parameters, windowed attention at
  four resolutions) is too heavy for CPU training, so :class:`HRNetLiteEncoder` keeps HRFormer's
  *high-resolution design* -- a stride-4 stem, parallel branches at 1/4, 1/8 and 1/16 resolution
  exchanging information by repeated multi-resolution fusion, and an HRNetV2-style output that
  upsamples every branch to 1/4 and concatenates them -- with residual convolution blocks instead
  of local-window transformer blocks.  The paper's ablation (Table 3) shows the convolutional
  HRNet generator with hierarchical learning on a par with HRFormer (DXA-BMD PCC 0.878 vs 0.888).
  The decoder is pix2pixHD's: two stride-2 transposed convolutions (1/4 -> 1) and a 7x7
  convolution after reflection padding.
* Input / output: one hip half, 1x512x256 (H x W, see :data:`screener.radiograph.HIP_SHAPE`), to a
  1x512x256 DRR (g/cm^2 of hydroxyapatite divided by the training set's ``drr_scale``).  Any
  H, W divisible by 16 is accepted (tests use small ones).  The output is linear (no tanh): DRR
  intensities are non-negative and unbounded, and the BMD is read from their mean.
* Discriminators: "the multi-scale discriminators D_1, D_2 and D_3 were used under three
  resolutions as in (Wang et al., 2018)" -- :class:`MultiscaleDiscriminator`, pix2pixHD's
  ``NLayerDiscriminator`` (4x4 convolutions, LeakyReLU 0.2, ``n_layers=3``) conditioned on the
  input (``cat(x, drr)``), each scale a 2x average-pooled copy of the previous, returning every
  layer's output for the feature-matching loss (pix2pixHD's ``getIntermFeat``); GroupNorm.
* Regression head ``M_R`` (section 3.3): "Transformer blocks ... S3-TFM_Rel and S4-TFM_Rel from
  CoAtNet" with input-independent relative attention, taking "a higher-resolution representation
  with 1/4 size learned by the encoder" -- :class:`RelativeTransformerHead`: two CoAtNet-style
  stages (stride-2 max-pool + 1x1 projection, then pre-norm transformer blocks whose attention
  logits add a learned relative-position bias), global average pooling, LayerNorm and a linear
  layer.  The first stage takes the 1/4 representation and works at 1/8, the second at 1/16.
  :class:`BMDRegressor` is ``R = {M_E, M_R}`` and can freeze ``M_E`` (the paper freezes it for the
  first epochs of stage 3, then tunes end to end).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "BMDGenerator",
    "BMDRegressor",
    "HRNetLiteEncoder",
    "MultiscaleDiscriminator",
    "NLayerDiscriminator",
    "PixHDDecoder",
    "RelativeTransformerHead",
    "group_norm",
]

#: One hip half (rows, columns), as :data:`screener.radiograph.HIP_SHAPE`.
INPUT_SHAPE = (512, 256)


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm with the largest of 8, 4, 2, 1 groups that divides ``channels``."""
    for g in (max_groups, 8, 4, 2, 1):
        if g <= max_groups and channels % g == 0:
            return nn.GroupNorm(g, channels)
    return nn.GroupNorm(1, channels)


def _conv_gn_relu(cin: int, cout: int, stride: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
                         group_norm(cout), nn.ReLU(inplace=True))


class _BasicBlock(nn.Module):
    """HRNet basic residual block (two 3x3 convolutions), GroupNorm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm1 = group_norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1, bias=False)
        self.norm2 = group_norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm1(self.conv1(x)), inplace=True)
        return F.relu(x + self.norm2(self.conv2(y)), inplace=True)


class _Fusion(nn.Module):
    """HRNet multi-resolution fusion: every output branch sums all input branches, resampled."""

    def __init__(self, channels: Sequence[int]) -> None:
        super().__init__()
        self.channels = tuple(channels)
        n = len(channels)
        self.paths = nn.ModuleList()
        for i in range(n):  # output branch
            row = nn.ModuleList()
            for j in range(n):  # input branch
                if j == i:
                    row.append(nn.Identity())
                elif j > i:  # lower resolution -> upsample: 1x1 conv then bilinear
                    row.append(nn.Sequential(nn.Conv2d(channels[j], channels[i], 1, bias=False),
                                             group_norm(channels[i])))
                else:  # higher resolution -> (i - j) stride-2 3x3 convolutions
                    steps: list[nn.Module] = []
                    c = channels[j]
                    for k in range(i - j):
                        last = k == i - j - 1
                        cout = channels[i] if last else c
                        steps += [nn.Conv2d(c, cout, 3, 2, 1, bias=False), group_norm(cout)]
                        if not last:
                            steps.append(nn.ReLU(inplace=True))
                    row.append(nn.Sequential(*steps))
            self.paths.append(row)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for i, row in enumerate(self.paths):
            acc = xs[i]
            for j, path in enumerate(row):
                if j == i:
                    continue
                y = path(xs[j])
                if j > i:
                    y = F.interpolate(y, size=xs[i].shape[-2:], mode="bilinear", align_corners=False)
                acc = acc + y
            out.append(F.relu(acc))
        return out


class _Stage(nn.Module):
    def __init__(self, channels: Sequence[int], blocks: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            nn.Sequential(*[_BasicBlock(c) for _ in range(blocks)]) for c in channels)
        self.fuse = _Fusion(channels)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.fuse([b(x) for b, x in zip(self.branches, xs)])


class HRNetLiteEncoder(nn.Module):
    """Encoder ``M_E``: high-resolution multi-branch backbone, output at 1/4 (or 1/2) of the input.

    Stem: two stride-2 3x3 convolutions (1 -> 1/4; ``stem_stride=2``: the second has stride 1 and
    all resolutions below are doubled).  Stage 2: branches at 1/4 and 1/8; stage 3:
    1/4, 1/8, 1/16; each stage ``blocks`` residual blocks per branch then a full fusion.  Output
    (HRNetV2 representation head): all branches upsampled to 1/4, concatenated, 1x1 convolution to
    ``out_channels``.

    Parameters
    ----------
    in_channels : int
        Image channels (1).
    width : int
        Channels of the 1/4 branch; the 1/8 and 1/16 branches have 2x and 4x.
    blocks : int
        Residual blocks per branch per stage.
    stages : int
        Number of 3-branch stages after the 2-branch one (HRNet repeats its modules).
    out_channels : int, optional
        Channels of the representation (default ``4 * width``).
    stem_stride : int
        Down-sampling of the stem, 4 (HRNet's, default) or 2: the second stem convolution keeps its
        resolution, so every branch and the representation are twice as fine (for a small input,
        where 1/4 leaves the femoral neck a few representation pixels wide).
    """

    def __init__(self, in_channels: int = 1, width: int = 16, blocks: int = 1, stages: int = 1,
                 out_channels: int | None = None, stem_stride: int = 4) -> None:
        super().__init__()
        if width < 1 or blocks < 1 or stages < 1:
            raise ValueError(f"width, blocks and stages must be >= 1 (got {width}, {blocks}, {stages})")
        if stem_stride not in (2, 4):
            raise ValueError(f"stem_stride must be 2 or 4 (got {stem_stride})")
        c1, c2, c3 = width, 2 * width, 4 * width
        self.out_channels = int(out_channels or 4 * width)
        self.stem_stride = int(stem_stride)
        self.stem = nn.Sequential(_conv_gn_relu(in_channels, c1, 2), _conv_gn_relu(c1, c1, stem_stride // 2))
        self.to_b2 = _conv_gn_relu(c1, c2, 2)
        self.stage2 = _Stage((c1, c2), blocks)
        self.to_b3 = _conv_gn_relu(c2, c3, 2)
        self.stage3 = nn.ModuleList(_Stage((c1, c2, c3), blocks) for _ in range(stages))
        self.head = nn.Sequential(nn.Conv2d(c1 + c2 + c3, self.out_channels, 1, bias=False),
                                  group_norm(self.out_channels), nn.ReLU())

    @property
    def target_layer(self) -> nn.Module:
        """The representation layer (for Grad-CAM style maps)."""
        return self.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h % 16 or w % 16:
            raise ValueError(f"input height and width must be multiples of 16, got {h}x{w}")
        b1 = self.stem(x)
        xs = self.stage2([b1, self.to_b2(b1)])
        xs = [xs[0], xs[1], self.to_b3(xs[1])]
        for stage in self.stage3:
            xs = stage(xs)
        size = xs[0].shape[-2:]
        cat = torch.cat([xs[0]] + [F.interpolate(t, size=size, mode="bilinear", align_corners=False)
                                   for t in xs[1:]], dim=1)
        return self.head(cat)


class PixHDDecoder(nn.Module):
    """Decoder ``M_D``: pix2pixHD GlobalGenerator upsampling (2 x ConvTranspose) + 7x7 output conv.

    Parameters
    ----------
    in_channels : int
        Representation channels.
    width : int
        Channels after the first upsampling (halved after the second, at least 8).
    out_channels : int
        DRR channels (1).
    upsamplings : int
        Transposed convolutions (2 for a 1/4 representation, 1 for 1/2: only the second, ``width / 2``
        channels, is kept).
    """

    def __init__(self, in_channels: int, width: int = 32, out_channels: int = 1, upsamplings: int = 2) -> None:
        super().__init__()
        if upsamplings not in (1, 2):
            raise ValueError(f"upsamplings must be 1 or 2 (got {upsamplings})")
        chans = [in_channels] + [width, max(8, width // 2)][2 - upsamplings:]
        layers: list[nn.Module] = []
        for cin, cout in zip(chans[:-1], chans[1:]):
            layers += [nn.ConvTranspose2d(cin, cout, 3, 2, 1, output_padding=1, bias=False),
                       group_norm(cout), nn.ReLU(inplace=True)]
        self.up = nn.Sequential(*layers)
        w2 = chans[-1]
        self.out = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(w2, out_channels, 7))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.out(self.up(z))


class BMDGenerator(nn.Module):
    """Decomposition generator ``G = {M_E, M_D}``: hip radiograph -> bone DRR (stage 1) or PF-DRR
    (stage 2).

    Parameters
    ----------
    in_channels, out_channels : int
        Radiograph and DRR channels (1 and 1).
    width : int
        Width of the encoder's 1/4 branch (default 16: ~0.22 M parameters; HRFormer-B has ~50 M).
    blocks, stages, stem_stride : int
        Encoder depth and stem (see :class:`HRNetLiteEncoder`); the decoder upsamples by ``stem_stride``.
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, width: int = 16,
                 blocks: int = 1, stages: int = 1, stem_stride: int = 4) -> None:
        super().__init__()
        self.encoder = HRNetLiteEncoder(in_channels, width, blocks, stages, stem_stride=stem_stride)
        self.decoder = PixHDDecoder(self.encoder.out_channels, 2 * width, out_channels,
                                    upsamplings=stem_stride // 2)

    @property
    def target_layer(self) -> nn.Module:
        """The encoder's representation layer."""
        return self.encoder.target_layer

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The learned representation (1/``stem_stride`` resolution) that stage 3 regresses from."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))


# ---------------------------------------------------------------------------------------------
# discriminators
# ---------------------------------------------------------------------------------------------
class NLayerDiscriminator(nn.Module):
    """pix2pixHD's PatchGAN discriminator returning every layer's output.

    ``conv4x4/2 -> LReLU``, ``n_layers - 1`` x ``conv4x4/2 -> GN -> LReLU`` (channels doubling,
    capped at ``8 * ndf``), ``conv4x4/1 -> GN -> LReLU``, ``conv4x4/1`` to one channel (the patch
    scores).  Padding 2 as pix2pixHD (``ceil((4 - 1) / 2)``).

    Parameters
    ----------
    in_channels : int
        Radiograph + DRR channels (2).
    ndf : int
        Channels of the first layer (pix2pixHD 64; default 16 for CPU).
    n_layers : int
        Stride-2 layers (pix2pixHD 3).
    """

    def __init__(self, in_channels: int = 2, ndf: int = 16, n_layers: int = 3) -> None:
        super().__init__()
        pad = 2
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(in_channels, ndf, 4, 2, pad), nn.LeakyReLU(0.2, True))]
        nf = ndf
        for _ in range(1, n_layers):
            prev, nf = nf, min(nf * 2, 8 * ndf)
            layers.append(nn.Sequential(nn.Conv2d(prev, nf, 4, 2, pad), group_norm(nf), nn.LeakyReLU(0.2, True)))
        prev, nf = nf, min(nf * 2, 8 * ndf)
        layers.append(nn.Sequential(nn.Conv2d(prev, nf, 4, 1, pad), group_norm(nf), nn.LeakyReLU(0.2, True)))
        layers.append(nn.Sequential(nn.Conv2d(nf, 1, 4, 1, pad)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiscaleDiscriminator(nn.Module):
    """Conditional multi-scale discriminators ``D_1 .. D_k`` (pix2pixHD), input ``cat(x, drr)``.

    Scale ``k`` sees the pair average-pooled ``k - 1`` times (3x3, stride 2, padding 1, padding not
    counted -- pix2pixHD's ``downsample``).

    Parameters
    ----------
    in_channels : int
        Radiograph channels + DRR channels (2).
    ndf, n_layers : int
        See :class:`NLayerDiscriminator`.
    num_scales : int
        Number of discriminators (paper: 3).

    Returns (forward)
    -----------------
    list of list of torch.Tensor
        ``out[k][i]``: output of layer ``i`` of the discriminator at scale ``k`` (``k = 0`` full
        resolution); ``out[k][-1]`` is that discriminator's patch-score map.
    """

    def __init__(self, in_channels: int = 2, ndf: int = 16, n_layers: int = 3, num_scales: int = 3) -> None:
        super().__init__()
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1 (got {num_scales})")
        self.discriminators = nn.ModuleList(NLayerDiscriminator(in_channels, ndf, n_layers) for _ in range(num_scales))
        self.downsample = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    @property
    def num_scales(self) -> int:
        """Number of discriminators."""
        return len(self.discriminators)

    def forward(self, x: torch.Tensor, drr: torch.Tensor) -> list[list[torch.Tensor]]:
        pair = torch.cat([x, drr.to(x.dtype)], dim=1)
        out = []
        for k, d in enumerate(self.discriminators):
            if k:
                pair = self.downsample(pair)
            out.append(d(pair))
        return out


# ---------------------------------------------------------------------------------------------
# regression (stage 3)
# ---------------------------------------------------------------------------------------------
class _RelAttention(nn.Module):
    """Multi-head self-attention with a learned, input-independent relative-position bias
    (CoAtNet's "relative attention": ``softmax(q k^T / sqrt(d) + w_{i-j})``)."""

    def __init__(self, dim: int, heads: int, grid: tuple[int, int]) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} not divisible by heads {heads}")
        self.heads, self.grid = heads, grid
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        gh, gw = grid
        self.bias_table = nn.Parameter(torch.zeros(heads, (2 * gh - 1) * (2 * gw - 1)))
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        coords = torch.stack([ys.flatten(), xs.flatten()])  # (2, N)
        rel = coords[:, :, None] - coords[:, None, :]  # (2, N, N)
        index = (rel[0] + gh - 1) * (2 * gw - 1) + (rel[1] + gw - 1)
        self.register_buffer("rel_index", index, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.bias_table[:, self.rel_index]  # (heads, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class _TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, grid: tuple[int, int], mlp_ratio: int = 4) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = _RelAttention(dim, heads, grid)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _TransformerStage(nn.Module):
    """CoAtNet transformer stage: stride-2 max-pool + 1x1 projection, then ``depth`` blocks."""

    def __init__(self, cin: int, dim: int, heads: int, depth: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(3, 2, 1)
        self.proj = nn.Conv2d(cin, dim, 1)
        self.grid = grid
        self.blocks = nn.ModuleList(_TransformerBlock(dim, heads, grid) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(self.pool(x))
        b, c, h, w = x.shape
        if (h, w) != self.grid:
            raise ValueError(f"regression head built for a {self.grid} token grid, got {(h, w)}; "
                             "construct it with the network's input shape")
        t = x.flatten(2).transpose(1, 2)
        for blk in self.blocks:
            t = blk(t)
        return t.transpose(1, 2).reshape(b, c, h, w)


class RelativeTransformerHead(nn.Module):
    """Regression head ``M_R``: two CoAtNet transformer stages (S3, S4) on the 1/4 representation.

    Parameters
    ----------
    in_channels : int
        Representation channels.
    rep_shape : tuple of int
        Spatial size of the 1/4 representation (input shape // 4), fixes the relative-bias tables.
    dims : tuple of int
        Token widths of the two stages.
    depths : tuple of int
        Transformer blocks per stage (CoAtNet-0: 5 and 2; default 2 and 1 for CPU).
    heads : int
        Attention heads.
    n_outputs : int
        Regressed values (1: DXA-BMD; 2: DXA- and QCT-BMD).
    pool : int
        Average-pool the representation by this factor first (2 for a 1/2 representation, so the
        head reads the paper's 1/4 grid and its attention costs what it does at 1/4).
    """

    def __init__(self, in_channels: int, rep_shape: tuple[int, int], dims: tuple[int, int] = (64, 128),
                 depths: tuple[int, int] = (2, 1), heads: int = 4, n_outputs: int = 1, pool: int = 1) -> None:
        super().__init__()
        if pool < 1 or rep_shape[0] % pool or rep_shape[1] % pool:
            raise ValueError(f"pool must be >= 1 and divide the representation {rep_shape} (got {pool})")
        self.pool = int(pool)
        rep_shape = (rep_shape[0] // pool, rep_shape[1] // pool)
        g1 = ((rep_shape[0] - 1) // 2 + 1, (rep_shape[1] - 1) // 2 + 1)
        g2 = ((g1[0] - 1) // 2 + 1, (g1[1] - 1) // 2 + 1)
        self.s3 = _TransformerStage(in_channels, dims[0], heads, depths[0], g1)
        self.s4 = _TransformerStage(dims[0], dims[1], heads, depths[1], g2)
        self.norm = nn.LayerNorm(dims[1])
        self.fc = nn.Linear(dims[1], n_outputs)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.pool > 1:
            z = F.avg_pool2d(z, self.pool)
        z = self.s4(self.s3(z))
        return self.fc(self.norm(z.mean(dim=(2, 3))))


class BMDRegressor(nn.Module):
    """Stage-3 regression network ``R = {M_E, M_R}``: radiograph -> BMD.

    Parameters
    ----------
    input_shape : tuple of int
        ``(H, W)`` of the radiograph (multiples of 16).
    width, blocks, stages, stem_stride : int
        Encoder hyper-parameters (must match the generator it inherits from); the head reads a 1/4
        grid either way (a 1/2 representation is average-pooled 2 x 2 first).
    n_outputs : int
        Regressed values.
    dims, depths, heads :
        See :class:`RelativeTransformerHead`.
    in_channels : int
        Image channels.

    Notes
    -----
    Build it from a trained generator with :meth:`from_generator` (the encoder's weights are
    copied); forward returns ``(B,)`` for one output, ``(B, n_outputs)`` otherwise.
    """

    def __init__(self, input_shape: tuple[int, int] = INPUT_SHAPE, width: int = 16, blocks: int = 1,
                 stages: int = 1, n_outputs: int = 1, dims: tuple[int, int] = (64, 128),
                 depths: tuple[int, int] = (2, 1), heads: int = 4, in_channels: int = 1,
                 stem_stride: int = 4) -> None:
        super().__init__()
        if input_shape[0] % 16 or input_shape[1] % 16:
            raise ValueError(f"input_shape must be multiples of 16, got {input_shape}")
        self.input_shape = tuple(input_shape)
        self.n_outputs = n_outputs
        self.encoder = HRNetLiteEncoder(in_channels, width, blocks, stages, stem_stride=stem_stride)
        self.head = RelativeTransformerHead(self.encoder.out_channels,
                                            (input_shape[0] // stem_stride, input_shape[1] // stem_stride),
                                            dims, depths, heads, n_outputs, pool=4 // stem_stride)

    @classmethod
    def from_generator(cls, generator: BMDGenerator, input_shape: tuple[int, int] = INPUT_SHAPE,
                       **kwargs: object) -> "BMDRegressor":
        """A regressor whose encoder is a copy of ``generator.encoder`` (the paper's inheritance)."""
        enc = generator.encoder
        width = enc.stem[0][0].out_channels
        blocks = len(enc.stage2.branches[0])
        stages = len(enc.stage3)
        in_ch = enc.stem[0][0].in_channels
        model = cls(input_shape, width=width, blocks=blocks, stages=stages, in_channels=in_ch,  # type: ignore[arg-type]
                    stem_stride=enc.stem_stride, **kwargs)
        model.encoder.load_state_dict(copy.deepcopy(enc.state_dict()))
        return model

    def freeze_encoder(self, frozen: bool = True) -> None:
        """Fix (or release) the encoder's weights, as in the first epochs of stage 3."""
        for p in self.encoder.parameters():
            p.requires_grad_(not frozen)

    @property
    def target_layer(self) -> nn.Module:
        """The encoder's representation layer (for Grad-RAM)."""
        return self.encoder.target_layer

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder representation."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.head(self.encoder(x))
        return y.squeeze(1) if self.n_outputs == 1 else y
