"""Entry point: `python run.py task=<name> [group=option ...] [key=value ...]`."""

import hydra
from omegaconf import DictConfig

import ldm.config  # noqa: F401  (registers the config schemas)
from ldm.tasks import dispatch


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    """Run the task named by cfg.task.name and return its headline metric."""
    return dispatch(cfg)


if __name__ == "__main__":
    main()
