"""Run by tests/compress/test_fsdp.py under torchrun: hpedge's distillation with Accelerate's FSDP2 wrapping on CPU.

Accelerate 1.15 enables FSDP only for GPU-type distributed types (on MULTI_CPU ranks ``ACCELERATE_USE_FSDP`` is
ignored), while torch's FSDP2 (``fully_shard``) itself runs on a CPU device mesh over gloo. This worker makes
Accelerate take its FSDP path on CPU ranks by reporting ``DistributedType.FSDP`` from the AcceleratorState, so
that everything after it is what an FSDP launch on GPUs runs: Accelerate's FSDP2 preparation (blocks wrapped by
class, optimizer param groups re-pointed at the sharded parameters), its sharded save_state / load_state and
get_state_dict, and hpedge's distill() unchanged.

usage: fsdp_worker.py PIPELINE WORK OUT.safetensors STEPS [--resume]
"""

import json
import sys
from pathlib import Path

from accelerate import Accelerator, FullyShardedDataParallelPlugin
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

from hpedge.compress.processes import Processes
from tests.compress.fsdp_common import run


def main() -> None:
    src, work, out, steps = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    acc = Accelerator()
    acc.state.fsdp_plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, auto_wrap_policy="transformer_based_wrap", transformer_cls_names_to_wrap=["JointTransformerBlock"],
        state_dict_type="SHARDED_STATE_DICT", reshard_after_forward=True)
    AcceleratorState.distributed_type = property(lambda self: DistributedType.FSDP, lambda self, v: None)  # see above
    procs = Processes(acc)
    assert procs.kind == "fsdp" and acc.is_fsdp2
    student, state = run(src, work, steps, resume="--resume" in sys.argv, procs=procs)
    if procs.is_main:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in student.state_dict().items()}, str(out),
                  metadata={"state": json.dumps({"losses": state.losses, "resumed_from": state.resumed_from})})


if __name__ == "__main__":
    main()
