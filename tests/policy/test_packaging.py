"""pyproject.toml and environment.yml pin the same versions; CI runs the README's test command."""

from __future__ import annotations

import re
import tomllib

import yaml

from conftest import REPO


def _normalise(req: str) -> tuple[str, str]:
    name, spec = re.match(r"^\s*([A-Za-z0-9_.\-\[\]]+)\s*(.*)$", req).groups()
    return name.lower().replace("_", "-"), ",".join(sorted(s.strip() for s in spec.split(",") if s))


def test_pyproject_and_environment_yml_pin_the_same_versions():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pyproject = dict(_normalise(r) for r in project["dependencies"])
    for extra in ("dev", "serve", "bench"):  # what `make test` installs besides the core
        pyproject.update(_normalise(r) for r in project["optional-dependencies"][extra])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    environment = dict(_normalise(r) for r in pip_section)
    assert environment == pyproject
    assert "python=3.11" in env["dependencies"]


def test_ci_runs_the_readme_test_command():
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and "make test" in ci


def test_make_pins_torch_exactly_so_pip_never_resolves_a_newer_build():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"TORCH_SPEC \?= torch==\d+\.\d+\.\d+", makefile)


def _locked(name: str) -> dict:
    """Return {package: version} pinned in requirements/<name>.lock."""
    text = (REPO / "requirements" / f"{name}.lock").read_text()
    return {m.group(1).lower().replace("_", "-"): m.group(2)
            for m in re.finditer(r"^([A-Za-z0-9_.\-]+)==([^\s\\]+)", text, re.M)}


def test_make_test_installs_the_serve_extra_and_chromium_for_the_browser_test():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"--extra [a-z,]*\bserve\b", makefile) and "gradio" in _locked("all")
    assert re.search(r"^test: .*\bbrowser\b", makefile, re.M)
    assert "apt-get install -y -q chromium" in makefile


def test_make_installs_the_bench_extra_and_registers_the_lm_eval_model():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"--extra [a-z,]*\bbench\b", makefile) and "lm-eval" in _locked("all")
    assert "python -m ldm.harness.plugin" in makefile


def test_every_lock_pins_exact_versions_with_hashes_and_leaves_torch_to_torch_spec():
    for name in ("core", "all", "minilm"):
        text = (REPO / "requirements" / f"{name}.lock").read_text()
        blocks = [b for b in re.split(r"\n(?=[A-Za-z0-9])", text) if re.match(r"[A-Za-z0-9]", b)]
        assert blocks, name
        for block in blocks:
            assert re.match(r"^[A-Za-z0-9_.\-]+==\S+", block), block[:80]
            assert "--hash=sha256:" in block, f"{name}.lock: {block.splitlines()[0]} has no hash"
        locked = _locked(name)
        assert "torch" not in locked and not any(p.startswith("nvidia-") for p in locked)


def test_the_locks_hold_every_dependency_within_pyprojects_ranges():
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = [r for reqs in project["optional-dependencies"].values() for r in reqs]
    for lock, reqs in (("core", project["dependencies"]), ("all", project["dependencies"] + extras)):
        locked = _locked(lock)
        for text in reqs:
            req = Requirement(text)
            name = req.name.lower().replace("_", "-")
            if name == "torch":
                continue
            assert name in locked, f"{name} missing from {lock}.lock"
            assert locked[name] in req.specifier, f"{lock}.lock: {name}=={locked[name]} vs {text}"
    core, every = _locked("core"), _locked("all")
    assert {k: v for k, v in every.items() if k in core} == core  # one version of each package


def test_make_install_takes_exact_versions_from_the_locks_and_make_lock_remakes_them():
    makefile = (REPO / "Makefile").read_text()
    assert "--require-hashes --no-deps" in makefile
    assert "-r $(CORE_LOCK)" in makefile and "-r $(ALL_LOCK)" in makefile
    assert re.search(r"^lock:", makefile, re.M) and "pip-compile" in makefile
    assert "$(BIN)/python -m pip check" in makefile and "\t$(PIP_CHECK)\n" in makefile


def test_the_environment_make_test_installed_is_the_lock():
    """pip freeze of the venv `make install-all` made equals requirements/all.lock."""
    import importlib.metadata as md
    import sys
    from pathlib import Path

    venv = REPO / ".venv"
    if Path(sys.prefix).resolve() != venv.resolve() or not (venv / ".ldm-installed").is_file():
        import pytest

        pytest.skip("not running in the .venv that make install-all made")
    different = {}
    for name, version in _locked("all").items():
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            installed = "missing"
        if installed != version:
            different[name] = (version, installed)
    assert not different, f"(locked, installed) differ: {different}"
