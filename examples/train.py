"""The reference training script, installed as ``disback train`` (its code: ``disback_core/train.py``).

    python examples/train.py --problem toy2d --method dmd2 --disback --iterations 1500 --out runs/train
    accelerate launch --num_processes 2 examples/train.py --problem toy2d --method dmd2 --disback
    torchrun --nproc-per-node 2 examples/train.py --problem digits --method sid --fsdp
    python examples/train.py --model tiny-sd3 --disback --export runs/train/onestep

The same options as ``disback train`` (``python examples/train.py --help``; the diffusers training
scripts' names are accepted too). Read :mod:`disback_core.train` as a template for your own loop.
"""

import sys

from disback_core.train import main

if __name__ == "__main__":
    main(sys.argv[1:])
