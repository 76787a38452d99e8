"""`lmtune` under `accelerate launch`, reporting what is still alive when the process group is destroyed.

`torchrun --nproc-per-node 2 teardown_probe.py ARGS` prints, from each process, how many
DistributedDataParallel wrappers exist (reachable or awaiting the garbage collector) when
`destroy_process_group` is called. It must be none: a wrapper freed later frees the gloo group from DDP's
reducer with the GIL held, which can hang the process (see `finish` in lmtune/train.py).
A test tool only: nothing in lmtune knows about it.
"""

import gc
import sys

import torch.distributed
from torch.nn.parallel import DistributedDataParallel

from lmtune.cli import main

destroy = torch.distributed.destroy_process_group


def probed_destroy(*args, **kwargs):
    alive = sum(isinstance(o, DistributedDataParallel) for o in gc.get_objects())
    print(f"teardown probe: rank {torch.distributed.get_rank()}: {alive} DDP alive", file=sys.stderr, flush=True)
    destroy(*args, **kwargs)


if __name__ == "__main__":
    torch.distributed.destroy_process_group = probed_destroy
    main(sys.argv[1:])
