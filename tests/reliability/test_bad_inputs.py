"""Every row of bad_inputs.CASES: non-zero exit, one clear line, no traceback, nothing written."""

from __future__ import annotations

import json
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from .bad_inputs import CASES, Case
from .conftest import copy_tree

pytestmark = pytest.mark.slow

PARALLEL = 2  # cases in flight at once; most fail within a second of starting

BAD_FILES = {
    "truncated.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n'
                       '{"instruction": "e", "outp',
    "wrong_schema.jsonl": '{"question": "a", "reply": "b"}\n',
    "bad_role.jsonl": '{"messages": [{"role": "robot", "content": "a"}, '
                      '{"role": "assistant", "content": "b"}]}\n',
    "content_number.jsonl": '{"messages": [{"role": "user", "content": 5}, '
                            '{"role": "assistant", "content": "b"}]}\n',
    "empty.jsonl": "",
    "empty.txt": "",
    "text_number.jsonl": '{"text": 5}\n',
    "arrays.jsonl": "[1, 2, 3]\n",
    "fake.parquet": "this is text, not parquet\n" * 10,
    "table.csv": "a,b\n1,2\n",
    "nul_prompt.txt": "a fine prompt\nanother \x00 one\n",
    "prompts_bad.jsonl": '{"prompt": "fine"}\n{"prompt": "cut\n',
    "other.txt": "A few words that were never prepared.\n",
    "two.jsonl": '{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": "d"}\n',
}


def write_bad_files(folder: Path) -> Path:
    folder.mkdir(parents=True)
    for name, text in BAD_FILES.items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "binary.txt").write_bytes(bytes(range(256)) * 8)
    answer = " ".join(["word"] * 400_000)  # one 2 MB line: an answer far past any context
    (folder / "huge_line.jsonl").write_text(json.dumps({"instruction": "say it",
                                                        "output": answer}) + "\n")
    return folder


class PickledCode:
    """Unpickling this runs code: creates the folder `marker`."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def damaged(folder: Path, export: Path, chat: Path, ckpt: Path) -> Path:
    """Build the damaged exports and checkpoints the table names under {bad}."""
    import torch

    folder.mkdir(parents=True)
    bare = copy_tree(chat, folder / "no_tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja"):
        (bare / name).unlink(missing_ok=True)
    truncate(copy_tree(export, folder / "truncated_weights") / "model.safetensors")
    truncate(copy_tree(chat, folder / "truncated_chat") / "model.safetensors")
    causal = copy_tree(chat, folder / "causal_lm")
    from transformers import GPT2Config

    (causal / "config.json").write_text(GPT2Config(n_layer=1, n_embd=32, n_head=2).to_json_string())
    (copy_tree(chat, folder / "bad_config") / "config.json").write_text("{not json")
    future = copy_tree(export, folder / "future_versions")
    info = json.loads((future / "ldm_export.json").read_text())
    info["versions"]["transformers"] = "99.0.0"
    (future / "ldm_export.json").write_text(json.dumps(info))
    truncate(copy_tree(ckpt, folder / "ckpt_truncated") / "model.safetensors")
    pickled = copy_tree(ckpt, folder / "ckpt_pickle")
    torch.save({"state": PickledCode(str(folder / "CODE_RAN")), "param_groups": []},
               pickled / "optimizer.bin")
    return folder


@pytest.fixture(scope="module")
def results(world, chat_export, launcher, tmp_path_factory):
    """Run every case (PARALLEL at a time); return {case id: (Result, its outputs folder)}."""
    root = tmp_path_factory.mktemp("bad_inputs")
    ckpt = world.clean_run / "checkpoints" / "step-0000002"
    places = {"data": str(world.outputs / "data"), "corpus": world.paths,
              "export": str(world.clean_export), "chat": str(chat_export),
              "files": str(write_bad_files(root / "files")),
              "bad": str(damaged(root / "bad", world.clean_export, chat_export, ckpt)),
              "ckpt": str(ckpt)}
    before = snapshot(world.outputs / "data")

    def one(c: Case):
        args = [a.format(**places) for a in c.args]
        outputs = root / "cases" / c.id
        return c.id, (launcher.run(args, outputs, timeout=240), outputs)

    with socket.socket() as busy, ThreadPoolExecutor(PARALLEL) as pool:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        places["busy_port"] = str(busy.getsockname()[1])
        done = dict(pool.map(one, CASES))
    done["__shared_data_unchanged__"] = snapshot(world.outputs / "data") == before
    done["__code_ran__"] = (Path(places["bad"]) / "CODE_RAN").exists()
    return done


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.stat().st_mtime_ns
            for p in folder.rglob("*") if p.is_file()}


def written_for_later_stages(outputs: Path) -> list:
    """Return what a later stage would read: manifests, exports, complete checkpoints."""
    if not outputs.exists():
        return []
    found = list(outputs.glob("data/**/manifest.json"))
    found += list(outputs.glob("models/*/model.safetensors"))
    found += list(outputs.glob("runs/**/checkpoints/step-*/trainer_state.json"))
    return [str(p.relative_to(outputs)) for p in found]


def test_table_has_at_least_70_distinct_cases():
    assert len(CASES) >= 70 and len({c.id for c in CASES}) == len(CASES)


def run_folders_left(outputs: Path) -> list:
    """Return the run folders a failed command left under outputs/runs."""
    runs = outputs / "runs"
    return [str(p.relative_to(outputs)) for p in runs.glob("*/*")] if runs.is_dir() else []


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_fails_with_one_clear_line_and_writes_nothing(case, results):
    proc, outputs = results[case.id]
    assert proc.returncode not in (0, -9), f"exit {proc.returncode}\n{proc.output[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.splitlines()
    if case.kind == "ldm":
        errors = [ln for ln in lines if ln.startswith("error:")]
        assert len(errors) == 1, proc.stderr[-3000:]
        lines = errors
    if case.kind == "hydra":  # Hydra names the bad value on one line, the options below it
        assert any(case.expect[0] in ln for ln in lines), proc.stderr[-3000:]
        assert all(e in proc.stderr for e in case.expect), proc.stderr[-3000:]
    else:
        assert any(all(e in ln for e in case.expect) for ln in lines), \
            f"no stderr line holds all of {case.expect}:\n{proc.stderr[-3000:]}"
    assert not written_for_later_stages(outputs)
    if not case.id.startswith("resume_"):  # a failed resume began training: its folder stays
        assert not run_folders_left(outputs), run_folders_left(outputs)
    assert not any((outputs / "data").glob("*")) if (outputs / "data").is_dir() else True


def test_no_bad_input_changed_the_shared_prepared_data(results):
    assert results["__shared_data_unchanged__"]


def test_a_checkpoint_with_pickled_code_never_runs_it(results):
    assert not results["__code_ran__"]


def test_full_error_shows_the_traceback_for_debugging(world, launcher, tmp_path):
    proc = launcher.run(["task=pretrain", "dataset=local_text", "dataset.paths=[/nowhere.txt]",
                         "tracking=off"], tmp_path, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "'/nowhere.txt' does not exist" in proc.stderr
