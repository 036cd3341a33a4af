"""One-step SDXL with DisBack's released UNet, as the DisBack README runs it (DMD2's recipe).

    python examples/sdxl_inference.py --base /path/to/stable-diffusion-xl-base-1.0 \\
        --checkpoint /path/to/disback_sdxl_unet.safetensors --prompt "a photo of a cat" --out cat.png

The released generator is a full SDXL UNet trained at one fixed timestep (399) on raw noise. The
README's recipe: build the UNet from SDXL-base's config, load the checkpoint, put it into
``StableDiffusionXLPipeline`` with ``LCMScheduler`` and sample with ``num_inference_steps=1,
guidance_scale=0, timesteps=[399]``. Here the checkpoint goes through
:func:`disback_core.export.load_checkpoint`: a ``.safetensors`` file through the library's checked
reader, a legacy ``.bin`` through ``torch.load(weights_only=True)`` (no code can run), every key
and shape checked against the config. Nothing is downloaded: ``--base`` is a local folder.

:func:`as_generator` gives the same UNet as the library's one-step generator ``G(z, cond)``
(e.g. to continue training it with DisBack from a distilled generator, the DisBack authors' own
SDXL recipe). The test (``tests/test_export.py``) runs all of it on a tiny random SDXL config.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

from disback_core import OneStepGenerator, timestep_generator
from disback_core.export import load_checkpoint

TIMESTEP = 399  # DisBack's (and DMD2's) one-step SDXL conditioning timestep


def load_pipeline(base: str | Path, checkpoint: str | Path, *, dtype: torch.dtype = torch.float16,
                  device: str | torch.device = "cpu") -> StableDiffusionXLPipeline:
    """SDXL-base from the local folder ``base`` with its UNet replaced by the released one-step UNet."""
    unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base, subfolder="unet"))
    load_checkpoint(unet, checkpoint)
    pipe = StableDiffusionXLPipeline.from_pretrained(base, unet=unet.to(dtype), torch_dtype=dtype)
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    return pipe.to(device)


def generate(pipe: StableDiffusionXLPipeline, prompt: str | list[str], *, seed: int = 0,
             timestep: int = TIMESTEP, **kwargs):
    """One step at ``timestep``, no guidance: the README's call."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return pipe(prompt=prompt, num_inference_steps=1, guidance_scale=0.0, timesteps=[timestep], generator=g,
                **kwargs).images


def as_generator(pipe: StableDiffusionXLPipeline, timestep: int = TIMESTEP) -> OneStepGenerator:
    """The pipeline's UNet as the library's ``G(z, cond)``; ``cond`` is the UNet's keyword dict
    (``encoder_hidden_states`` and ``added_cond_kwargs``)."""
    return timestep_generator(pipe.unet, timestep, scheduler=pipe.scheduler)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--base", required=True, help="local SDXL-base folder (save_pretrained layout)")
    p.add_argument("--checkpoint", required=True, help="the released UNet (.safetensors, or a legacy .bin)")
    p.add_argument("--prompt", default="a photo of a cat")
    p.add_argument("--out", default="disback_sdxl.png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    dtype = torch.float16 if a.device.startswith("cuda") else torch.float32
    pipe = load_pipeline(a.base, a.checkpoint, dtype=dtype, device=a.device)
    generate(pipe, a.prompt, seed=a.seed)[0].save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
