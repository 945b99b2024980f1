"""Run `run.py ARGS` with FSDP2 forced on CPU processes (gloo), for the FSDP tests.

accelerate selects FSDP only for GPU process groups; on CPU it reports MULTI_CPU. This wraps
ldm's accelerator factory so the run takes accelerate's real FSDP2 path (fully_shard per layer,
sharded checkpoints, gathered export) with the plugin the h100x8_fsdp preset's config builds.
Launch it like run.py: `torchrun --standalone --nproc_per_node 2 tests/fsdp_cpu_run.py ...`.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _fsdp_plugin():
    from accelerate.utils import FullyShardedDataParallelPlugin

    return FullyShardedDataParallelPlugin(
        fsdp_version=2, reshard_after_forward=True, auto_wrap_policy="transformer_based_wrap",
        transformer_cls_names_to_wrap=["BertLayer", "ModernBertEncoderLayer"],
        state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False)


def main() -> None:
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    import ldm.train.loop as loop

    build = loop.make_accelerator

    def make_fsdp_accelerator(cfg):
        accelerator = build(cfg)
        # AcceleratorState is shared by every Accelerator of the process and copies
        # PartialState's distributed_type whenever it is constructed again: set both
        accelerator.state.fsdp_plugin = _fsdp_plugin()
        accelerator.state.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        return accelerator

    loop.make_accelerator = make_fsdp_accelerator
    sys.argv = [str(REPO / "run.py"), *sys.argv[1:]]
    runpy.run_path(str(REPO / "run.py"), run_name="__main__")


if __name__ == "__main__":
    main()
