"""A pre-imported parent that forks one `python run.py ...` process per request.

Importing torch, transformers, datasets and mlflow takes 5-20 s per process on a busy CI machine;
the reliability suite starts ~60 processes. This parent imports them once (and runs nothing
else: no thread, no torch op), then forks; each child sets its own environment, working folder,
argv and standard streams and runs `run.py` as `__main__`, exactly as `python run.py ARGS`
would after its imports. Children are real processes: they are killed by real signals, hold
their own file locks, and exit with their own status.

Protocol (one line each way, JSON in, text out):
  in:  {"id": n, "argv": [...], "env": {...}, "cwd": "...", "stdin": path|null,
        "stdout": path, "stderr": path}
  out: "ready" once imported; "spawned <id> <pid>"; "exit <pid> <wait status>".
"""

from __future__ import annotations

import json
import os
import select
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def preload() -> None:
    """Import what every `run.py` process imports, so children start warm."""
    sys.path.insert(0, REPO)
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import hydra  # noqa: F401
    import mlflow  # noqa: F401
    import pyarrow  # noqa: F401
    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from mlflow.tracking import MlflowClient  # noqa: F401
    from transformers import AutoModelForMaskedLM, AutoTokenizer  # noqa: F401
    import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    import mlflow.store.tracking.rest_store  # noqa: F401
    import transformers.models.bert.modeling_bert  # noqa: F401
    import transformers.models.modernbert.modeling_modernbert  # noqa: F401

    import ldm.config  # noqa: F401
    import ldm.data.pretrain  # noqa: F401
    import ldm.data.sft  # noqa: F401
    import ldm.model  # noqa: F401
    import ldm.tasks  # noqa: F401
    import ldm.tasks.prepare  # noqa: F401
    import ldm.tasks.train_common  # noqa: F401
    import ldm.tracking  # noqa: F401
    import ldm.train.loop  # noqa: F401


def child(request: dict) -> None:
    """Become `python run.py ARGV` in this (forked) process; never returns."""
    code = 1
    try:
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        stdin = os.open(request.get("stdin") or os.devnull, os.O_RDONLY)
        out = os.open(request["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        err = os.open(request["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        for fd, target in ((stdin, 0), (out, 1), (err, 2)):
            os.dup2(fd, target)
            os.close(fd)
        sys.stdin = open(0, "r", closefd=False)
        sys.stdout = open(1, "w", closefd=False, buffering=1)
        sys.stderr = open(2, "w", closefd=False, buffering=1)
        sys.argv = list(request["argv"])
        import runpy

        try:
            runpy.run_path(sys.argv[0], run_name="__main__")
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if not isinstance(exc.code, (int, type(None))):
                print(exc.code, file=sys.stderr)
        except BaseException:  # noqa: BLE001 - what an uncaught exception does in a fresh process
            import traceback

            traceback.print_exc()
            code = 1
        import atexit

        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code)


def main() -> None:
    preload()
    os.write(1, b"ready\n")
    buffer = b""
    while True:
        readable, _, _ = select.select([0], [], [], 0.05)
        if readable:
            chunk = os.read(0, 1 << 16)
            if not chunk:
                return
            buffer += chunk
            while b"\n" in buffer:
                line, buffer = buffer.split(b"\n", 1)
                request = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    child(request)
                os.write(1, f"spawned {request['id']} {pid}\n".encode())
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            os.write(1, f"exit {pid} {status}\n".encode())


if __name__ == "__main__":
    main()
