import math

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
