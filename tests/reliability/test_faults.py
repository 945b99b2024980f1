"""Faults while a run goes on: the tracking server goes away, the disk fills, a write is refused,
the loss turns non-finite, a second command takes the same run_name."""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from ldm.faults import pause_file

from .conftest import error_line, same_tree, same_weights

pytestmark = pytest.mark.slow

MLFLOW = Path(sys.executable).with_name("mlflow")


def wait_paused(child, folder: Path, name: str, timeout: float = 240) -> Path:
    """Wait until `child` is paused at kill point `name`; return the marker to delete."""
    marker = pause_file(folder, name)
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if child.poll() is not None:
            result = child.wait()
            raise AssertionError(f"exited ({result.returncode}) before pausing at {name}: "
                                 f"{result.output[-3000:]}")
        assert time.monotonic() < deadline, f"never paused at {name}"
        time.sleep(0.05)
    return marker


def pausing(folder: Path, *names: str) -> dict:
    return {"LDM_PAUSE_AT": ",".join(names), "LDM_PAUSE_DIR": str(folder)}


# --- the tracking server -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on a sqlite store, which the test can stop and start again."""

    def __init__(self, root: Path, port: int):
        self.root, self.port, self.proc = root, port, None
        self.uri = f"http://127.0.0.1:{port}"

    def start(self, timeout: float = 120) -> None:
        log = open(self.root / "server.log", "a")
        self.proc = subprocess.Popen(
            [str(MLFLOW), "server", "--backend-store-uri", f"sqlite:///{self.root / 'db'}",
             "--default-artifact-root", str(self.root / "art"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=log, start_new_session=True, cwd=self.root)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("mlflow server did not start: "
                                     + (self.root / "server.log").read_text()[-2000:])
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One mlflow server (and store) for the tests below, which stop and restart it."""
    running = MlflowServer(tmp_path_factory.mktemp("mlflow_server"), free_port())
    try:
        running.start()
        yield running
    finally:
        running.stop()


def test_tracking_server_lost_mid_run_buffers_metrics_and_flushes_them_when_it_returns(
        world, launcher, server, tmp_path):
    from mlflow.tracking import MlflowClient

    pauses = tmp_path / "pauses"
    pauses.mkdir()
    if server.proc is None:
        server.start()
    child = launcher.start(
        [*world.pretrain(steps=8), "tracking=mlflow_server", f"tracking.uri={server.uri}",
         "run_name=server-lost"], world.outputs, env=pausing(pauses, "step:2", "step:5"))
    marker = wait_paused(child, pauses, "step:2")
    server.stop()  # the server goes away after step 2
    marker.unlink()
    marker = wait_paused(child, pauses, "step:5")  # steps 3-5 ran with no server
    server.start()  # back, on the same port and store
    marker.unlink()
    proc = child.wait()
    assert proc.returncode == 0, proc.output[-3000:]
    assert proc.output.count("is unreachable") == 1, proc.output[-3000:]
    assert "is back; buffered writes sent" in proc.output
    assert not (world.outputs / "runs" / "pretrain" / "server-lost" /
                "mlflow_unsent.jsonl").exists()
    client = MlflowClient(server.uri)
    (run,) = client.search_runs([client.get_experiment_by_name("pretrain").experiment_id],
                                "attributes.run_name = 'server-lost'")
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == list(range(1, 9)), steps
    assert run.info.status == "FINISHED"


def test_tracking_server_lost_for_good_saves_unsent_metrics_to_the_fallback_file(
        world, launcher, server, tmp_path):
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    if server.proc is None:
        server.start()
    child = launcher.start(
        [*world.pretrain(steps=4), "tracking=mlflow_server", f"tracking.uri={server.uri}",
         "run_name=server-gone"], world.outputs, env=pausing(pauses, "step:1"))
    marker = wait_paused(child, pauses, "step:1")
    server.stop()
    marker.unlink()
    proc = child.wait()
    assert proc.returncode == 0, proc.output[-3000:]
    fallback = world.outputs / "runs" / "pretrain" / "server-gone" / "mlflow_unsent.jsonl"
    assert f"unsent metrics saved to {fallback}" in proc.stderr
    unsent = [json.loads(line) for line in fallback.read_text().splitlines()]
    assert sorted(m["step"] for m in unsent if m.get("key") == "loss") == [2, 3, 4], unsent
    assert (world.outputs / "models" / "server-gone" / "model.safetensors").is_file()


def test_unreachable_tracking_uri_fails_before_training_unless_not_required(world, launcher):
    uri = f"http://127.0.0.1:{free_port()}"
    command = [*world.pretrain(steps=2), "tracking=mlflow_server", f"tracking.uri={uri}"]
    proc = launcher.run([*command, "run_name=no-server"], world.outputs)
    line = error_line(proc)
    assert uri in line and "tracking.required=false" in line
    assert not (world.outputs / "runs" / "pretrain" / "no-server" / "checkpoints").exists()
    assert not (world.outputs / "models" / "no-server").exists()

    proc = launcher.run([*command, "tracking.required=false", "run_name=no-server-ok"],
                        world.outputs)
    assert proc.returncode == 0, proc.output[-3000:]
    assert "mlflow tracking disabled: cannot reach" in proc.output
    assert (world.outputs / "models" / "no-server-ok" / "model.safetensors").is_file()


# --- the disk ----------------------------------------------------------------------------------


def test_disk_full_during_a_checkpoint_is_a_clear_error_and_the_previous_one_resumes_exactly(
        world, launcher, tmp_path):
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    command = [*world.pretrain(), "tracking=off", "run_name=disk-full"]
    run_dir = world.outputs / "runs" / "pretrain" / "disk-full"
    child = launcher.start(command, world.outputs, env=pausing(pauses, "step:3"))
    marker = wait_paused(child, pauses, "step:3")
    # from now on no file of this process may grow past 64 KiB: the log still can, the
    # 128 KiB model.safetensors of checkpoint 4 cannot (EFBIG, as on a full disk)
    resource.prlimit(child.pid, resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
    marker.unlink()
    line = error_line(child.wait())
    assert "could not save the checkpoint of step 4" in line and "step-0000002" in line
    assert "intact" in line
    ckpts = run_dir / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000002"]
    assert not (world.outputs / "models" / "disk-full").exists()
    assert not same_tree(ckpts / "step-0000002", world.clean_run / "checkpoints" / "step-0000002")

    proc = launcher.run(command, world.outputs)  # space is back: the same command resumes
    assert proc.returncode == 0, proc.output[-3000:]
    assert f"resumed from {ckpts / 'step-0000002'} at step 2" in proc.output
    assert same_weights(world.outputs / "models" / "disk-full" / "model.safetensors",
                        world.clean_export / "model.safetensors")


def test_unwritable_checkpoint_folder_is_a_clear_error_and_the_previous_checkpoint_stays(
        world, launcher):
    # tests run as root, where permissions stop nothing: a file where the save's folder must go
    run_dir = world.outputs / "runs" / "pretrain" / "blocked"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / ".step-0000004.partial").write_text("in the way")
    command = [*world.pretrain(), "tracking=off", "run_name=blocked"]
    line = error_line(launcher.run(command, world.outputs))
    assert "could not save the checkpoint of step 4" in line and "step-0000002" in line
    assert not same_tree(run_dir / "checkpoints" / "step-0000002",
                         world.clean_run / "checkpoints" / "step-0000002")
    assert not (world.outputs / "models" / "blocked").exists()


# --- the loss ----------------------------------------------------------------------------------


def test_non_finite_steps_are_skipped_counted_in_mlflow_and_the_run_still_checkpoints(
        world, launcher):
    from mlflow.tracking import MlflowClient

    from ldm.runs import find_runs
    from ldm.tracking import local_store_uri

    command = [*world.pretrain(steps=4), "task.lr=1e30", "task.grad_clip=0",
               "task.warmup_steps=0", "task.skip_nonfinite=true", "run_name=skips"]
    proc = launcher.run(command, world.outputs)
    assert proc.returncode == 0, proc.output[-3000:]
    assert "step skipped" in proc.output
    (run,) = [r for r in find_runs(local_store_uri(world.outputs), "pretrain")
              if r.info.run_name == "skips"]
    history = MlflowClient(local_store_uri(world.outputs)).get_metric_history(
        run.info.run_id, "skipped_steps")
    skipped = sorted((m.step, m.value) for m in history)
    assert skipped and skipped[-1][1] == len(skipped) and skipped[-1][0] == 4, skipped
    ckpts = world.outputs / "runs" / "pretrain" / "skips" / "checkpoints"
    assert [p.name for p in sorted(ckpts.glob("step-*"))] == ["step-0000002", "step-0000004"]
    assert (world.outputs / "models" / "skips" / "model.safetensors").is_file()


# --- two commands, one run_name ----------------------------------------------------------------


def test_second_run_with_the_same_run_name_is_refused_before_it_writes_anything(
        world, launcher, tmp_path):
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    command = [*world.pretrain(steps=2), "tracking=off", "run_name=twice"]
    run_dir = world.outputs / "runs" / "pretrain" / "twice"
    first = launcher.start(command, world.outputs, env=pausing(pauses, "step:1"))
    marker = wait_paused(first, pauses, "step:1")
    before = (run_dir / ".hydra" / "overrides.yaml").read_text()
    second = launcher.run([*command, "seed=7"], world.outputs)
    line = error_line(second)
    assert str(run_dir) in line and "already going" in line and f"pid {first.pid}" in line
    assert (run_dir / ".hydra" / "overrides.yaml").read_text() == before, "the second run wrote"
    marker.unlink()
    done = first.wait()
    assert done.returncode == 0, done.output[-3000:]
    assert "seed=7" not in (run_dir / ".hydra" / "overrides.yaml").read_text()
