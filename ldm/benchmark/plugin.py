"""Make `lm_eval --model ldm` work: register the adapter with lm-eval when lm-eval starts.

lm-eval 0.4 finds models only in its own registry (there is no entry-point group for models),
and the `lm_eval` command imports nothing of ours. So `make` installs `ldm_lm_eval.pth` into the
environment's site-packages; Python runs its one line at start-up. The line costs nothing until
lm-eval is imported: it adds an import hook that, right after `lm_eval.api.registry` loads,
registers "ldm" as a lazy entry (`ldm.benchmark.adapter:LdmLM`, imported only when used), after
the harness's own models. If ldm is not importable then, the name is simply unknown.

    python -m ldm.benchmark.plugin            # install into this interpreter's site-packages
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

PTH_NAME = "ldm_lm_eval.pth"
TARGET = "ldm.benchmark.adapter:LdmLM"

_HOOK = '''
import sys
class _LdmLmEvalHook:
    def find_spec(self, name, path=None, target=None):
        if name != "lm_eval.api.registry":
            return None
        sys.meta_path.remove(self)
        import importlib.util
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            try:
                import lm_eval.models
                if "ldm" not in module.model_registry:
                    module.model_registry.register("ldm", target="%s")
            except Exception:
                pass
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, _LdmLmEvalHook())
''' % TARGET


def pth_line() -> str:
    """Return the one line of ldm_lm_eval.pth (a .pth runs lines that start with `import`)."""
    return f"import sys; exec({_HOOK!r})\n"


def install(site_packages: Path | None = None) -> Path:
    """Write ldm_lm_eval.pth into `site_packages` (default: this interpreter's); return its path."""
    folder = Path(site_packages or sysconfig.get_paths()["purelib"])
    path = folder / PTH_NAME
    path.write_text(pth_line())
    return path


if __name__ == "__main__":
    print(f"installed {install(Path(sys.argv[1]) if len(sys.argv) > 1 else None)}")
