import contextlib
import math
import signal
from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def ring_means(k: int = 8, radius: float = 2.0) -> torch.Tensor:
    ang = torch.arange(k) * 2 * math.pi / k
    return torch.stack([radius * ang.cos(), radius * ang.sin()], 1)


def tiny_unet2d(**kw):
    from diffusers import UNet2DModel

    cfg = dict(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
               down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
               norm_num_groups=4)
    cfg.update(kw)
    return UNet2DModel(**cfg).eval()


def tiny_unet2d_condition(**kw):
    from diffusers import UNet2DConditionModel

    cfg = dict(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=12, attention_head_dim=4, norm_num_groups=4)
    cfg.update(kw)
    return UNet2DConditionModel(**cfg).eval()


class CustomLinear(torch.nn.Module):
    """A layer like NVlabs EDM's: weight and bias as plain parameters, a functional call (not nn.Linear)."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(o, i) / i**0.5)
        self.bias = torch.nn.Parameter(torch.zeros(o))

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype))


class CustomConv2d(torch.nn.Module):
    def __init__(self, i, o, k=3):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(o, i, k, k) / (i * k * k) ** 0.5)
        self.bias = torch.nn.Parameter(torch.zeros(o))

    def forward(self, x):
        return torch.nn.functional.conv2d(x, self.weight.to(x.dtype), self.bias.to(x.dtype),
                                          padding=self.weight.shape[-1] // 2)


class CustomEDM(torch.nn.Module):
    """A tiny EDM-preconditioned conv net of custom layers, called as net(x, sigma, class_labels); sigma
    must be a tensor (``sigma.to``), as in NVlabs' EDMPrecond."""

    def __init__(self, channels=2, width=8, sigma_data=0.5):
        super().__init__()
        self.sigma_data = sigma_data
        self.conv0 = CustomConv2d(channels, width)
        self.affine = CustomLinear(16, width)
        self.conv1 = CustomConv2d(width, channels)
        self.norm = torch.nn.GroupNorm(2, width)

    def forward(self, x, sigma, class_labels=None):
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip, c_out = sd**2 / (sigma**2 + sd**2), sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in, c_noise = 1 / (sigma**2 + sd**2).sqrt(), sigma.log().flatten() / 4
        freqs = torch.arange(8, device=x.device, dtype=torch.float32)
        emb = torch.cat([(c_noise[:, None] * 2**freqs).sin(), (c_noise[:, None] * 2**freqs).cos()], 1)
        h = self.conv0((c_in * x).to(self.conv0.weight.dtype))
        h = torch.nn.functional.silu(self.norm(h) + self.affine(emb.to(h.dtype))[:, :, None, None])
        return (c_skip * x + c_out * self.conv1(h).float()).to(x.dtype)


class CaseTimeout(BaseException):
    """Raised into a case that runs past its deadline (not an Exception: nothing may catch it)."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Interrupt the block after ``seconds`` (SIGALRM; a no-op where it does not exist)."""
    if not hasattr(signal, "setitimer"):
        yield
        return

    def fire(signum, frame):
        raise CaseTimeout()
    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def crashing_at(k: int, targets, fn) -> bool:
    """Run ``fn`` in a forked child that dies (``os._exit``: no cleanup runs, like SIGKILL) just before
    its k-th call of any ``(object, attribute)`` in ``targets`` (the child's own copies: the parent is
    untouched); returns whether ``fn`` completed first. The child never returns into the test session."""
    import os

    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        calls = [0]

        def crashing(f):
            def g(*a, **kw):
                calls[0] += 1
                if calls[0] == k:
                    os._exit(3)
                return f(*a, **kw)
            return g

        try:
            for obj, name in targets:
                setattr(obj, name, crashing(getattr(obj, name)))
            fn()
        finally:
            os._exit(0 if calls[0] < k else 4)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0
