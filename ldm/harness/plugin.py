"""Make `lm_eval --model ldm` work: register the adapter with lm-eval when lm-eval starts.

lm-eval 0.4 finds models only in its own registry (there is no entry-point group for models),
and the `lm_eval` command imports nothing of ours. So `make` installs `ldm_lm_eval.pth` into the
environment's site-packages; Python runs its one line at start-up. The line costs nothing until
lm-eval is imported: it adds an import hook that, right after `lm_eval.api.registry` loads,
registers "ldm" as a lazy entry (`ldm.harness.adapter:LdmLM`, imported only when used), after
the harness's own models. If ldm is not importable then, the name is simply unknown.

A .pth written by an older ldm names the adapter where it was then (`ldm.benchmark.adapter`).
It breaks nothing at start-up or when lm-eval loads (the line imports nothing of ours and the
entry is lazy), and importing the adapter (task=benchmark does) replaces that entry; only the
`lm_eval --model ldm` command then fails to import the old module. Writing the file again fixes
it: `make` does whenever this file changes, and task=benchmark prints `registration_note()`.

    python -m ldm.harness.plugin            # install into this interpreter's site-packages
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

PTH_NAME = "ldm_lm_eval.pth"
TARGET = "ldm.harness.adapter:LdmLM"

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


def registration_note(site_packages: Path | None = None) -> str | None:
    """Return one line saying how to fix `lm_eval --model ldm` when this interpreter's .pth is
    missing or registers another adapter than TARGET (written by an older ldm); else None."""
    path = Path(site_packages or sysconfig.get_paths()["purelib"]) / PTH_NAME
    if path.is_file() and path.read_text() == pth_line():
        return None
    state = "names an older adapter module" if path.is_file() else "is not installed"
    return (f"{path} {state}, so `lm_eval --model ldm` cannot find this adapter; run "
            "`python -m ldm.harness.plugin` (make does)")


def install(site_packages: Path | None = None) -> Path:
    """Write ldm_lm_eval.pth into `site_packages` (default: this interpreter's); return its path."""
    folder = Path(site_packages or sysconfig.get_paths()["purelib"])
    path = folder / PTH_NAME
    path.write_text(pth_line())
    return path


if __name__ == "__main__":
    print(f"installed {install(Path(sys.argv[1]) if len(sys.argv) > 1 else None)}")
