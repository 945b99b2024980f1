"""Entry point: `python run.py task=<name> [group=option ...] [key=value ...]`."""

import sys

import hydra
from omegaconf import DictConfig

import ldm.config  # noqa: F401  (registers the config schemas)
from ldm.tasks import dispatch
from ldm.ranks import is_main_process


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run the task named by cfg.task.name and return its headline metric."""
    return dispatch(cfg)


def quiet_other_ranks(argv: list) -> list:
    """Return argv with overrides that keep ranks other than 0 from writing into the run folder.

    Every rank of `accelerate launch` / `torchrun` composes the same named run folder; only rank 0
    writes Hydra's `.hydra/` files and the run log there, the others log to the console only.
    """
    if is_main_process():
        return argv
    extra = ["hydra.output_subdir=null"]
    if not any("job_logging" in arg for arg in argv[1:]):
        extra.append("hydra/job_logging=stdout")
    return [*argv, *extra]


if __name__ == "__main__":
    sys.argv = quiet_other_ranks(sys.argv)
    main()
