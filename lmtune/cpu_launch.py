"""Several CPU processes from `accelerate launch --cpu`, which by itself starts only one.

accelerate's simple launcher runs a single process for --cpu (huggingface/accelerate#2741). lmtune
notices, reads the counts it was asked for, and starts the processes itself with torch's own launcher.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def cpu_processes_requested() -> tuple[int, int, int]:
    """(processes in all, machines, this machine's rank) when `accelerate launch --cpu` started only this
    one process; (1, 1, 0) otherwise.

    accelerate's simple launcher runs a single process for --cpu (huggingface/accelerate#2741). It
    exports MASTER_ADDR only when asked for several processes or machines and sets no rank variables;
    the numbers are on its command line, or in the --config_file it was given.
    """
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "MASTER_ADDR" not in env:
        return 1, 1, 0
    if any(k in env for k in ("WORLD_SIZE", "LOCAL_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")):
        return 1, 1, 0  # already one of several processes
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return 1, 1, 0
    # `accelerate launch ARGS` or `python -m accelerate.commands.launch ARGS`
    start = next((i + 1 for i, a in enumerate(parent) if a in ("launch", "accelerate.commands.launch")), None)
    if start is None:
        return 1, 1, 0
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    # The launcher's arguments read by its own parser. As in accelerate, a flag wins over the config file,
    # and the default one (`accelerate config`) is read only without --cpu.
    args, _ = launch_command_parser().parse_known_args(parent[start:])
    if args.config_file is None and not args.cpu and Path(default_config_file).is_file():
        args.config_file = default_config_file
    saved = load_config_from_file(args.config_file) if args.config_file else None

    def setting(name: str, default: int) -> int:
        value = getattr(args, name)
        return int(value if value is not None else getattr(saved, name, None) or default)

    return setting("num_processes", 1), setting("num_machines", 1), setting("machine_rank", 0)


def launch_cpu_processes(processes: int, machines: int, rank: int, argv: list[str]) -> int:
    """Start this machine's share of the CPU processes accelerate was asked for (`processes` counts all
    machines', as accelerate's --num_processes does), with torch's own launcher (torchrun)."""
    import subprocess

    here = max(1, processes // machines)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // here))}  # share the cores
    # CPU processes must not see a GPU: on a machine with one, rank 1 otherwise reached for cuda:1 and
    # failed ("invalid device ordinal", seen on an H100 machine).
    env["CUDA_VISIBLE_DEVICES"] = ""
    cmd = [
        sys.executable, "-m", "lmtune.cpu_launch", f"--nnodes={machines}", f"--node-rank={rank}",
        f"--nproc-per-node={here}", f"--master-addr={env['MASTER_ADDR']}",
        f"--master-port={env.get('MASTER_PORT', '29500')}", "-m", "lmtune", *argv,
    ]  # fmt: skip
    return subprocess.call(cmd, env=env)


def torchrun(argv: list[str]) -> int:
    """torch's launcher (torchrun) with `argv`, without its report of a failed process (a traceback and a
    table of ranks, exit codes and pids): the process that failed has said why in lmtune's one line. One
    killed by a signal could not, so that is said here. Returns the exit code of the first that failed."""
    import logging
    import signal

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    for name in list(logging.root.manager.loggerDict):  # "failed (exitcode: 1) local_rank: 1 ...", said already
        if name.startswith("torch.distributed.elastic"):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        if failure.exitcode >= 0:
            return failure.exitcode
        name = signal.Signals(-failure.exitcode).name
        print(f"error: process {rank} of the run was killed by {name}; resume the run with --resume", file=sys.stderr)
        return 128 - failure.exitcode
    return 0


if __name__ == "__main__":  # lmtune's CPU processes, started by launch_cpu_processes
    sys.exit(torchrun(sys.argv[1:]))
