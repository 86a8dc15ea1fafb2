"""The processes of one ``hpedge compress`` run: one Accelerator for the whole command.

Launched plainly there is one process. Under ``accelerate launch`` (or ``torchrun``) every process runs the
command; this object tells each one its rank, and the stages use it to split their work:

* the work folder and OUT are created, written and removed by the main process, between barriers;
* the contribution analysis and the teacher's sample pool are split across ranks (each rank writes its own
  share atomically, so each share resumes on its own) and merged by the main process;
* distillation is data parallel (DDP, FSDP or DeepSpeed, as the launch configuration says);
* evaluation, the grid and logging run on the main process.

Nothing here imports torch at module import (``import hpedge`` stays light).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

# a barrier waits while the main process evaluates, draws the grid or merges; the default (30 min under
# gloo, 10 min under NCCL) is shorter than the 500-prompt evaluation of a large model
BARRIER_TIMEOUT = timedelta(hours=6)


@dataclass
class Processes:
    accelerator: Any

    @classmethod
    def start(cls, mixed_precision: str = "no") -> "Processes":
        """The run's Accelerator (the launch configuration's distributed type, FSDP / DeepSpeed plugins from
        ``accelerate launch --config_file``); ``mixed_precision`` from the command line."""
        from accelerate import Accelerator, InitProcessGroupKwargs

        return cls(Accelerator(mixed_precision=mixed_precision,
                               kwargs_handlers=[InitProcessGroupKwargs(timeout=BARRIER_TIMEOUT)]))

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def world(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def device(self) -> Any:
        return self.accelerator.device

    @property
    def kind(self) -> str:
        """no | multi_cpu | multi_gpu | fsdp | deepspeed ... (Accelerate's DistributedType, lower case)."""
        return str(self.accelerator.distributed_type.value).lower()

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()

    def share(self, items: list[Any]) -> list[Any]:
        """This rank's share of ``items`` (every world-th item, starting at its rank)."""
        return items[self.rank :: self.world]

    def mean(self, value: float) -> float:
        """The mean of a float over all ranks (the value itself in a single process)."""
        if self.world == 1:
            return value
        import torch

        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        return float(self.accelerator.reduce(t, reduction="mean")[0])


def is_main_process() -> bool:
    """True on the main process of a launch (and in a plain single-process run); for the CLI's printing."""
    from accelerate import PartialState

    return bool(PartialState().is_main_process)
