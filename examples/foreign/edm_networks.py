"""NVlabs-EDM-style networks (``training/networks.py`` layout), small enough for a CPU.

A stand-in for the EDM codebase that DMD2, Diff-Instruct and SiD build on. What matters here is the
shape users meet in that code, not image quality:

* the layers are custom ``torch.nn.Module`` s (not ``nn.Linear`` / ``nn.Conv2d``) that keep
  ``self.weight`` / ``self.bias`` as plain parameters and call ``torch.nn.functional`` in ``forward``;
* ``SongUNet`` (DDPM++) keeps its blocks in ``enc`` / ``dec`` ``ModuleDict`` s keyed ``'8x8_block0'`` etc.;
* ``EDMPrecond`` is the denoiser ``D(x, sigma, class_labels)``; it wants ``sigma`` as a tensor.

    python examples/foreign/edm_networks.py
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# ----------------------------------------------------------------------------
# Weight initialisation, as the EDM layers take it: a mode plus a multiplier.


def weight_init(shape: list[int], mode: str, fan_in: int, fan_out: int) -> Tensor:
    """Random tensor of ``shape`` drawn by one of the four usual fan-based rules."""
    if mode == 'xavier_uniform':
        return math.sqrt(6 / (fan_in + fan_out)) * (torch.rand(*shape) * 2 - 1)
    if mode == 'xavier_normal':
        return math.sqrt(2 / (fan_in + fan_out)) * torch.randn(*shape)
    if mode == 'kaiming_uniform':
        return math.sqrt(3 / fan_in) * (torch.rand(*shape) * 2 - 1)
    if mode == 'kaiming_normal':
        return math.sqrt(1 / fan_in) * torch.randn(*shape)
    raise ValueError(f'Invalid init mode "{mode}"')


# ----------------------------------------------------------------------------
# Layers.


class Linear(nn.Module):
    """Fully connected layer with EDM's initialisation; weight is ``[out_features, in_features]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 init_mode: str = 'kaiming_normal', init_weight: float = 1, init_bias: float = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        init = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = nn.Parameter(weight_init([out_features, in_features], **init) * init_weight)
        self.bias = nn.Parameter(weight_init([out_features], **init) * init_bias) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.weight.to(x.dtype), bias)


class Conv2d(nn.Module):
    """Same-padding 2-D convolution, optionally preceded by 2x nearest upsampling or 2x average pooling."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, init_mode: str = 'kaiming_normal', init_weight: float = 1,
                 init_bias: float = 0) -> None:
        super().__init__()
        if kernel < 1:
            raise ValueError('kernel must be >= 1')
        if up and down:
            raise ValueError('up and down are exclusive')
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        shape = [out_channels, in_channels, kernel, kernel]
        init = dict(mode=init_mode, fan_in=in_channels * kernel ** 2, fan_out=out_channels * kernel ** 2)
        self.weight = nn.Parameter(weight_init(shape, **init) * init_weight)
        self.bias = nn.Parameter(weight_init([out_channels], **init) * init_bias) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        if self.up:
            x = F.interpolate(x, scale_factor=2, mode='nearest')
        if self.down:
            x = F.avg_pool2d(x, 2)
        w = self.weight.to(x.dtype)
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.conv2d(x, w, bias, padding=w.shape[-1] // 2)


class GroupNorm(nn.Module):
    """Group normalisation that uses fewer groups on narrow layers (at least ``min_channels_per_group``)."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5) -> None:
        super().__init__()
        self.num_groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


class PositionalEmbedding(nn.Module):
    """Transformer-style sinusoidal embedding of a batch of scalars: ``[N] -> [N, num_channels]``."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


# ----------------------------------------------------------------------------
# The U-Net block: residual conv pair with an embedding-driven affine, optional resampling and attention.


class UNetBlock(nn.Module):
    """DDPM++ residual block; submodules ``norm0 conv0 affine norm1 conv1 [skip] [norm2 qkv proj]``."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False,
                 down: bool = False, attention: bool = False, num_heads: int | None = None,
                 channels_per_head: int = 64, dropout: float = 0, skip_scale: float = 1, eps: float = 1e-5,
                 adaptive_scale: bool = True) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        if not attention:
            self.num_heads = 0
        else:
            self.num_heads = num_heads if num_heads is not None else max(1, out_channels // channels_per_head)
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=math.sqrt(0.2))

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, kernel=1, up=up, down=down, **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init_attn)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = (x + (self.skip(orig) if self.skip is not None else orig)) * self.skip_scale

        if self.num_heads:
            n, c, h, w = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(n * self.num_heads, c // self.num_heads, 3, -1)
            q, k, v = qkv.unbind(2)
            attn = torch.einsum('ncq,nck->nqk', q, k / math.sqrt(k.shape[1])).softmax(dim=2)
            a = torch.einsum('nqk,nck->ncq', attn, v)
            x = (self.proj(a.reshape(n, c, h, w)) + x) * self.skip_scale
        return x


# ----------------------------------------------------------------------------
# DDPM++ U-Net (Song et al.), the "standard" encoder/decoder variant.


class SongUNet(nn.Module):
    """DDPM++ U-Net: ``forward(x, noise_labels, class_labels)``; blocks in ``enc`` / ``dec`` ModuleDicts."""

    def __init__(self, img_resolution: int, in_channels: int, out_channels: int, label_dim: int = 0,
                 model_channels: int = 16, channel_mult: tuple[int, ...] = (1, 2), num_blocks: int = 1,
                 attn_resolutions: tuple[int, ...] = (4,), dropout: float = 0.0,
                 label_dropout: float = 0) -> None:
        super().__init__()
        self.img_resolution = img_resolution
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * 4
        noise_channels = model_channels
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        block_kwargs = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout,
                            skip_scale=math.sqrt(0.5), eps=1e-6, adaptive_scale=False)

        # Mapping: noise level (and label) -> embedding.
        self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True)
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        # Encoder.
        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                attn = res in attn_resolutions
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder: every '_block' entry takes one encoder output as a skip connection.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if level == 0:
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None,
                augment_labels: Tensor | None = None) -> Tensor:
        """``augment_labels`` is accepted for call compatibility; this network has no augment mapping."""
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape)  # swap sin/cos
        if self.map_label is not None:
            tmp = class_labels
            if self.training and self.label_dropout:
                keep = (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(tmp.dtype)
                tmp = tmp * keep
            emb = emb + self.map_label(tmp * math.sqrt(self.map_label.in_features))
        emb = F.silu(self.map_layer0(emb))
        emb = F.silu(self.map_layer1(emb))

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        aux = None
        tmp = None
        for name, block in self.dec.items():
            if name.endswith('_aux_norm'):
                tmp = block(x)
            elif name.endswith('_aux_conv'):
                tmp = block(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if '_block' in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux


# ----------------------------------------------------------------------------
# EDM preconditioning (Karras et al. 2022): the denoiser D(x; sigma) around the raw network F.

_MODELS = {'SongUNet': SongUNet}


class EDMPrecond(nn.Module):
    """``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)``; ``sigma`` must be a tensor, as in NVlabs."""

    def __init__(self, img_resolution: int, img_channels: int, label_dim: int = 0, use_fp16: bool = False,
                 sigma_min: float = 0, sigma_max: float = float('inf'), sigma_data: float = 0.5,
                 model_type: str = 'SongUNet', **model_kwargs) -> None:
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = _MODELS[model_type](img_resolution=img_resolution, in_channels=img_channels,
                                         out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None = None, force_fp32: bool = False,
                **model_kwargs) -> Tensor:
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        use_half = self.use_fp16 and not force_fp32 and x.device.type == 'cuda'
        dtype = torch.float16 if use_half else torch.float32

        sd = self.sigma_data
        c_skip = sd ** 2 / (sigma ** 2 + sd ** 2)
        c_out = sigma * sd / (sigma ** 2 + sd ** 2).sqrt()
        c_in = 1 / (sd ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4

        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        assert F_x.dtype == dtype
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def round_sigma(self, sigma: float | Tensor) -> Tensor:
        return torch.as_tensor(sigma)


def tiny_edm(label_dim: int = 0, seed: int = 0) -> EDMPrecond:
    """A 2-channel 8x8 DDPM++ EDM denoiser (~0.19M parameters), deterministic in ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EDMPrecond(img_resolution=8, img_channels=2, label_dim=label_dim, model_channels=16,
                          channel_mult=(1, 2), num_blocks=1, attn_resolutions=(4,))


if __name__ == '__main__':
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = tiny_edm(label_dim=4)
    x = torch.randn(3, 2, 8, 8)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    labels = torch.eye(4)[torch.tensor([0, 1, 2])]
    out = net(x, sigma, labels)
    n_params = sum(p.numel() for p in net.parameters())
    print(f'params {n_params}, D_x {tuple(out.shape)}, |D_x| {out.abs().mean():.4f}')
