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


def test_make_test_installs_the_serve_extra_and_chromium_for_the_browser_test():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r'-e "\.\[[a-z,]*\bserve\b[a-z,]*\]"', makefile)
    assert re.search(r"^test: .*\bbrowser\b", makefile, re.M)
    assert "apt-get install -y -q chromium" in makefile


def test_make_installs_the_bench_extra_and_registers_the_lm_eval_model():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r'-e "\.\[[a-z,]*\bbench\b[a-z,]*\]"', makefile)
    assert "python -m ldm.benchmark.plugin" in makefile
