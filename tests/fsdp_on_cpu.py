"""`lmtune` with Accelerate's FSDP really on, on CPU: `accelerate launch --config_file fsdp.yaml fsdp_on_cpu.py ARGS`.

Accelerate 1.15 turns FSDP on only for GPUs and other accelerators (`AcceleratorState.__init__`); for CPU
processes it keeps plain data parallelism, even when an FSDP config or plugin is given. PyTorch's FSDP 2
itself shards over gloo on CPU, so this launcher sets Accelerate's distributed type to FSDP after it
decided, and lmtune's FSDP code (sharded weights and optimizer state, gathered saves) runs for real.
A test tool only: nothing in lmtune knows about it.
"""

import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

from lmtune.cli import main

decide = AcceleratorState.__init__


def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    decide(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # Accelerate copies the type back from PartialState each time an AcceleratorState is made.
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP


if __name__ == "__main__":
    AcceleratorState.__init__ = fsdp_on_cpu
    main(sys.argv[1:])
