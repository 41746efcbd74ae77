"""`python -m torch.distributed.run --nproc_per_node 2 srpo_two_ranks.py CKPT DATA OUT [overrides...]`: the
RL stage for 3 steps on every rank (gloo on CPU), for tests/test_srpo.py."""

import logging
import sys

from kat_core.config import load_config
from kat_core.train.srpo import srpo
from kat_core.util import short_lived_gc

short_lived_gc()  # as a stage's process: no final garbage collection over torch and transformers
logging.basicConfig(level=logging.INFO)
ckpt, data, out, *overrides = sys.argv[1:]
config = load_config("smoke", [*overrides, "srpo.train.steps=3", "srpo.train.checkpoint_every=3",
                               "srpo.prompts_per_step=4"])
srpo(config, ckpt, data, out, progress=False)
