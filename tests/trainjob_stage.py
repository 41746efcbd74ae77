"""A stage the TrainJob tests run on every rank: it joins a gloo process group from the environment the rank
entry point sets (RANK, WORLD_SIZE, MASTER_ADDR/PORT), all-reduces, reads its staged input, writes its output
on rank 0 and returns what it saw."""

import os
from pathlib import Path


def stage(config, data_dir, out_dir, *, note="", train_cfg=None):
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    try:
        rank, world = dist.get_rank(), dist.get_world_size()
        total = torch.tensor([rank + 1])
        dist.all_reduce(total)
        if rank == 0:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            (Path(out_dir) / "weights.txt").write_text(f"trained on {Path(data_dir, 'rows.txt').read_text()}")
        return {"rank": rank, "world": world, "sum": int(total.item()), "note": note,
                "env_rank": os.environ["RANK"], "grad_accum": config.train.grad_accum,
                "backend": config.train.backend, "train_cfg_steps": train_cfg.steps if train_cfg else None}
    finally:
        dist.destroy_process_group()
