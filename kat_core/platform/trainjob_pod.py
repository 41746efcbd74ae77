"""What runs inside a TrainJob's pods (built by `kat_core.platform.trainjob`). The `deepspeed-distributed`
runtime is OpenMPI: the launcher pod runs `mpirun` over ssh to the node pods, and two entry points run:

    python -m kat_core.platform.trainjob_pod launch --np W   on the launcher: MASTER_ADDR is the hostfile's
                                                             first host (rank 0's), the job's env is
                                                             forwarded, mpirun starts the ranks
    python -m kat_core.platform.trainjob_pod rank            on every rank: OpenMPI's rank variables become
                                                             RANK/LOCAL_RANK/WORLD_SIZE (what the engine and
                                                             DeepSpeed read), then the stage call in
                                                             KAT_TRAINJOB_CALL runs; rank 0 writes its result
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from kat_core.errors import KatError
from kat_core.platform.trainjob import CALL_ENV, FORWARD_ENV, MASTER_PORT, POD_MODULE, StageCall, call_entry
from kat_core.util import atomic_write

log = logging.getLogger(__name__)

HOSTFILE = "/etc/mpi/hostfile"  # where the MPI plugin mounts the hostfile in the launcher
# what mpirun must carry to the ranks it starts over ssh (sshd gives them a bare environment)
ALWAYS_FORWARD = ("PATH", "LD_LIBRARY_PATH", "PYTHONPATH", "HOME", "MASTER_ADDR", "MASTER_PORT")


def read_hostfile(text: str) -> list[tuple[str, int]]:
    """OpenMPI hostfile lines `host slots=N` -> [(host, N)]."""
    hosts = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        host, *rest = line.split()
        slots = next((int(item.split("=", 1)[1]) for item in rest if item.startswith("slots=")), 1)
        hosts.append((host, slots))
    return hosts


def mpirun_argv(hostfile: str, hostfile_text: str, np: int, forward: list[str],
                python: str = "python") -> tuple[list[str], str]:
    """The launcher's mpirun command line and MASTER_ADDR (the first host: ranks fill hosts in order, so
    rank 0 runs there). Checks the hostfile has a slot for every process."""
    hosts = read_hostfile(hostfile_text)
    if not hosts:
        raise KatError(f"the MPI hostfile {hostfile} lists no hosts")
    slots = sum(n for _, n in hosts)
    if slots < np:
        raise KatError(f"the MPI hostfile {hostfile} has {slots} slots on {len(hosts)} hosts, fewer than the "
                       f"{np} processes asked for (GPUs per node must match cluster.distributed.gpus_per_node)")
    argv = ["mpirun", "--hostfile", hostfile, "-np", str(np), "--map-by", "slot", "--bind-to", "none"]
    for name in forward:
        argv += ["-x", name]
    return argv + [python, "-m", POD_MODULE, "rank"], hosts[0][0]


def rank_env(environ: dict[str, str]) -> dict[str, str]:
    """RANK/LOCAL_RANK/WORLD_SIZE from OpenMPI's per-process variables (already-set values win)."""
    mapping = {"RANK": "OMPI_COMM_WORLD_RANK", "LOCAL_RANK": "OMPI_COMM_WORLD_LOCAL_RANK",
               "WORLD_SIZE": "OMPI_COMM_WORLD_SIZE"}
    return {k: environ.get(k) or environ[v] for k, v in mapping.items() if k in environ or v in environ}


def run_call(call: StageCall, rank: int) -> Any:
    """Run the stage call in this process; rank 0 writes the result (atomically)."""
    from kat_core.config import load_config

    config = load_config(call.profile, list(call.overrides))
    value = call_entry(call.entry, config, {**call.paths, **call.kwargs}, call.config_kwargs)
    if rank == 0 and call.result:
        atomic_write(call.result, json.dumps(value, default=str))
    return value


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog=f"python -m {POD_MODULE}")
    sub = parser.add_subparsers(dest="command", required=True)
    launch = sub.add_parser("launch", help="on the launcher: mpirun the ranks")
    launch.add_argument("--np", type=int, required=True)
    launch.add_argument("--hostfile", default=os.environ.get("OMPI_MCA_orte_default_hostfile", HOSTFILE))
    sub.add_parser("rank", help="on every rank: run the stage call in KAT_TRAINJOB_CALL")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stdout)
    try:
        if args.command == "launch":
            text = Path(args.hostfile).read_text()
            hosts = read_hostfile(text)
            if hosts:  # rank 0's host; mpirun_argv checks the rest
                os.environ["MASTER_ADDR"] = hosts[0][0]
            os.environ.setdefault("MASTER_PORT", str(MASTER_PORT))
            names = (*ALWAYS_FORWARD, *os.environ.get(FORWARD_ENV, "").split(","))
            forward = [n for n in dict.fromkeys(names) if n and n in os.environ]  # mpirun -x needs them set
            command, master = mpirun_argv(args.hostfile, text, args.np, forward)
            log.info("launching %d processes, rank 0 on %s: %s", args.np, master, " ".join(command))
            os.execvp(command[0], command)  # does not return
            return 0
        from kat_core.util import short_lived_gc

        short_lived_gc()  # a rank's process ends seconds sooner (torch, transformers, deepspeed loaded)
        os.environ.update(rank_env(dict(os.environ)))
        call = StageCall(**json.loads(os.environ[CALL_ENV]))
        run_call(call, int(os.environ.get("RANK", "0")))
    except KatError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
