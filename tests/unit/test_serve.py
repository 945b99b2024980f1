"""task=serve: the page's API through gradio_client against a live server on a loopback port.

Layer: unit, the page served in-process on a thread; one slow test starts `run.py task=serve`
(the API: test_serve_api.py; the page in a browser: test_serve_browser.py).
"""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

pytest.importorskip("gradio")
from gradio_client import Client  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

from conftest import CONF  # noqa: E402
from test_sample_task import make_export  # noqa: E402

SMALL = dict(max_new_tokens=16, steps=16, block_length=8)
STATE = re.compile(r'data-state="(\w+)" data-committed="(\d+)" data-masked="(\d+)"')


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Live:
    """A served page with the API beside it: its url, the engine and batcher behind them, and a
    knob that slows each model call."""

    def __init__(self, export, title: str = "tiny", multi_turn=None, api_key=None,
                 window_ms: float = 20.0):
        from ldm.model import load_model
        from ldm.sampling import sampler_model
        from ldm.sampling.decode import chat_banned_ids
        from ldm.serve.api import ChatApi, Running, build_api
        from ldm.serve.app import build_app, mount
        from ldm.serve.batcher import Batcher
        from ldm.serve.engine import Engine
        from ldm.serve.settings import load_presets
        from ldm.tokenizer import load_tokenizer

        self.tok = load_tokenizer(str(export))
        model = load_model("export", str(export), dtype="float32", attn_implementation="sdpa",
                           trust_remote_code=False).eval()
        self.base_fn, self.delay, self.prompts = sampler_model(model), 0.0, []
        self.calls = 0

        def model_fn(ids, mask):
            self.calls += 1
            if self.delay:
                time.sleep(self.delay)
            return self.base_fn(ids, mask)

        # a bare function is an opaque model: every call comes through here (the tests' delay)
        positions = model.config.max_position_embeddings
        self.engine = Engine(model_fn, self.tok, mask_id=self.tok.mask_token_id,
                             max_positions=positions)
        answer = self.engine.answer

        def recording(messages, runs, session=None):
            self.prompts.append([dict(m) for m in messages])
            return answer(messages, runs, session)

        self.engine.answer = recording
        presets = load_presets(CONF / "sampler")
        self.batcher = Batcher(model_fn, self.tok, mask_id=self.tok.mask_token_id,
                               special_ids=chat_banned_ids(self.tok), window_s=window_ms / 1000)
        self.api = ChatApi(self.batcher, self.tok, presets, "llada", model_id=title,
                           max_positions=positions, model_fn=model_fn, api_key=api_key)
        self.demo = build_app(self.engine, presets, "llada", title=title, multi_turn=multi_turn)
        port = free_port()
        self.server = Running(mount(build_api(self.api), self.demo, "127.0.0.1", port),
                              "127.0.0.1", port)
        self.url = self.server.url
        self.model_id = title

    def client(self) -> Client:
        return Client(self.url, verbose=False, download_files=False)

    def close(self) -> None:
        self.server.close()
        self.batcher.close()


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    server = Live(make_export(tmp_path_factory.mktemp("serve") / "chat", chat=True))
    yield server
    server.close()


def states(outputs, column):
    """Return (state, committed, masked) of the canvas in each streamed output."""
    return [tuple(int(x) if x.isdigit() else x for x in STATE.search(o[column]).groups())
            for o in outputs]


def wait_for(condition, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_chat_streams_growing_canvases_then_the_library_samplers_answer(live):
    from ldm.sampling.render import clean_answer
    from ldm.sampling.sampler import generate
    from ldm.sampling.settings import SamplerSettings
    from ldm.tokenizer import encode_chat

    client = live.client()
    job = client.submit(message="the king spoke", **SMALL, api_name="/chat")
    final = job.result(timeout=120)
    seen = states(job.outputs(), 1)
    running = [s for s in seen if s[0] == "running"]
    assert len(running) >= 2 and seen[-1][0] == "done"
    assert seen.index(running[-1]) < len(seen) - 1  # every running state came before the end
    committed = [c for _, c, _ in running]  # the done canvas ends at EOS, so it is left out
    assert committed == sorted(committed) and committed[0] < committed[-1]
    assert all(c + m == 16 for state, c, m in running)
    # The page's answer is the library sampler's answer for the same prompt and settings.
    ids = encode_chat(live.tok, [{"role": "user", "content": "the king spoke"}],
                      add_generation_prompt=True)[0]
    engine = live.engine
    settings = SamplerSettings(**SMALL, max_positions=128)
    direct = generate(live.base_fn, [ids], settings, mask_id=engine.mask_id,
                      eos_id=engine.eos_id, special_ids=engine.special_ids, pad_id=engine.pad_id)
    expected = clean_answer(live.tok, direct.tokens[0], engine.mask_id, engine.eos_id)
    conversation = final[0]
    assert [m["role"] for m in conversation] == ["user", "assistant"]
    shown = conversation[1]["content"][0]["text"]
    assert shown == (expected or "(empty answer)")  # the bubble holds the answer alone
    assert re.search(rf"{direct.nfe} model calls · [\d.]+ s · [\d.]+ tokens/s", final[2])


def test_second_turn_sends_the_first_exchange_to_the_model(live):
    client = live.client()
    first = client.predict(message="hello there", **SMALL, api_name="/chat")
    client.predict(message="and then?", conversation=first[0], **SMALL, api_name="/chat")
    messages = live.prompts[-1]
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[0]["content"] == "hello there" and messages[2]["content"] == "and then?"
    client.predict(api_name="/clear")
    client.predict(message="fresh start", **SMALL, api_name="/chat")
    assert [m["role"] for m in live.prompts[-1]] == ["user"]


@pytest.mark.parametrize("settings, message", [
    (dict(message="hi", max_new_tokens=16, steps=16, block_length=7), "block_length=7"),
    (dict(message="hi", max_new_tokens=16, steps=32, block_length=8), "steps=32"),
    (dict(message="hi", max_new_tokens=16, steps=16, block_length=8, top_p=0.0), "top_p=0.0"),
    (dict(message="   "), "write a message first"),
    (dict(message="the king spoke " * 60), "exceeds the model's 128 positions"),
    (dict(message="bell \x07 rings", **SMALL), "control character"),
])
def test_bad_settings_and_prompts_get_a_message_and_the_server_keeps_serving(
        live, settings, message):
    client = live.client()
    with pytest.raises(AppError, match=re.escape(message)):
        client.predict(**settings, api_name="/chat")
    answer = client.predict(message="still there?", **SMALL, api_name="/chat")
    assert answer[0][-1]["role"] == "assistant"


def test_two_concurrent_clients_both_get_answers_one_run_at_a_time(live):
    live.delay = 0.02
    try:
        jobs = [c.submit(message=f"question {i}", **SMALL, api_name="/chat")
                for i, c in enumerate([live.client(), live.client()])]
        results = [job.result(timeout=120) for job in jobs]
    finally:
        live.delay = 0.0
    for i, result in enumerate(results):
        assert result[0][0]["content"][0]["text"] == f"question {i}"
        assert "model calls" in result[2]
    assert live.engine.running() == 0


def test_stop_button_ends_the_run_and_keeps_the_partial_canvas(live):
    live.delay = 0.05
    client = live.client()
    try:
        job = client.submit(message="a long one", max_new_tokens=64, steps=64, block_length=32,
                            api_name="/chat")
        wait_for(lambda: len(job.outputs()) >= 3)
        stopped_before = live.engine.stats["stopped"]
        client.predict(api_name="/stop")
        job.result(timeout=60)
    finally:
        live.delay = 0.0
    last = states(job.outputs(), 1)[-1]
    assert last[0] == "stopped" and last[1] < 64
    assert live.engine.stats["stopped"] == stopped_before + 1


def test_a_cancelled_request_stops_its_run(live):
    live.delay = 0.05
    try:
        job = live.client().submit(message="never mind", max_new_tokens=64, steps=64,
                                   block_length=32, api_name="/chat")
        # Cancel once the client has streamed a frame: gradio_client learns the event's id
        # only then, and a cancel sent without it is refused by the server (HTTP 422).
        wait_for(lambda: live.engine.running() == 1 and len(job.outputs()) >= 1)
        steps = live.engine.stats["steps"]
        job.cancel()
        wait_for(lambda: live.engine.running() == 0, timeout=40)
    finally:
        live.delay = 0.0
    assert live.engine.stats["steps"] - steps < 40  # far fewer than the 64 it was asked for


def test_a_run_whose_reader_went_away_leaves_the_runs_in_flight_unclosed(live):
    # A cancelled request's generator may never be closed by the server: the run must still
    # stop (after abandon_after unread) and leave the runs in flight when its worker ends.
    from ldm.sampling.settings import SamplerSettings

    settings = SamplerSettings(max_new_tokens=64, steps=64, block_length=32, max_positions=128)
    live.delay, live.engine.abandon_after = 0.05, 1.0
    try:
        frames = live.engine.answer([{"role": "user", "content": "never mind"}], [settings])
        next(frames)  # the first frame is read, then nothing more, and nothing closes it
        assert live.engine.running() == 1
        stopped = live.engine.stats["stopped"]
        wait_for(lambda: live.engine.running() == 0, timeout=20)
        assert live.engine.stats["stopped"] == stopped + 1
        frames.close()  # closing it afterwards is harmless
        assert live.engine.running() == 0
    finally:
        live.delay, live.engine.abandon_after = 0.0, 10.0


def test_side_by_side_streams_both_canvases_with_their_model_calls(live):
    client = live.client()
    job = client.submit(prompt="the king", left="llada", right="fast", max_new_tokens=16,
                        api_name="/side_by_side")
    left_html, left_stats, right_html, right_stats = job.result(timeout=120)
    assert left_stats.startswith("**llada**") and right_stats.startswith("**fast**")
    calls = [int(re.search(r"(\d+) model calls", s).group(1)) for s in (left_stats, right_stats)]
    assert calls[0] == 16 and 1 <= calls[1] <= 16
    assert 'data-state="done"' in left_html and 'data-state="done"' in right_html
    assert len(job.outputs()) > 4  # both canvases were redrawn while they were sampled


def test_infill_fills_every_span_and_keeps_the_rest(live):
    from ldm.sampling.prompts import encode_infill, parse_infill

    client = live.client()
    text = "The king [MASK:4] the queen [MASK:2]."
    job = client.submit(text=text, **SMALL, api_name="/infill")
    html, filled, stats = job.result(timeout=120)
    seen = states(job.outputs(), 0)
    assert seen[-1] == ("done", 6, 0) and any(s[0] == "running" for s in seen)
    ids, ranges = encode_infill(live.tok, parse_infill(text), live.tok.mask_token_id)
    assert filled.startswith("The king") and filled.endswith(".")
    assert "model calls" in stats
    with pytest.raises(AppError, match=re.escape("[MASK:N]")):
        client.predict(text="no span here", **SMALL, api_name="/infill")


def test_preset_fills_the_settings_from_conf_sampler(live):
    values = live.client().predict("fast", api_name="/preset")
    assert list(values) == [64, 64, 32, 0.9, 0.0, 1.0, 0.0, "low_confidence"]


def test_every_preset_file_becomes_a_choice(tmp_path):
    import shutil

    from ldm.serve.settings import load_presets, page_sampler, preset_values

    for path in (CONF / "sampler").glob("*.yaml"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "tiny.yaml").write_text("defaults:\n  - schema\n  - _self_\nname: tiny\n"
                                        "max_new_tokens: 8\nsteps: ${.max_new_tokens}\n"
                                        "block_length: 8\n")
    presets = load_presets(tmp_path)
    assert {"llada", "fast", "original", "tiny"} <= set(presets)
    assert preset_values(presets, "tiny")["steps"] == 8
    assert preset_values(presets, "llada", max_new_tokens=16)["steps"] == 16  # follows
    assert page_sampler(presets, "fast", {"threshold": 0.0}).threshold is None
    assert page_sampler(presets, "fast").threshold == 0.9


@pytest.mark.slow
def test_cli_serves_the_page_on_the_configured_loopback_port(tmp_path):
    import json
    import os
    import signal
    import subprocess
    import sys

    from conftest import REPO, default_sigint

    export = make_export(tmp_path / "chat", chat=True)
    port = free_port()
    env = {**os.environ, "LDM_OUTPUTS": str(tmp_path / "outputs"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "run.py"), "task=serve", f"checkpoint={export}",
         f"serve.port={port}", "sampler=fast", "sampler.max_new_tokens=16", "sampler.block_length=16",
         "tracking=off"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=default_sigint)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if f"http://127.0.0.1:{port}" in line:
                break
        assert proc.poll() is None, "".join(lines)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        assert client.predict("fast", api_name="/preset")[:3] == (16, 16, 16)  # command line's
        answer = client.predict(message="hello", max_new_tokens=16, steps=16, block_length=16,
                                api_name="/chat")
        assert "model calls" in answer[2]
        from urllib.request import urlopen

        with urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as reply:  # the API too
            assert json.loads(reply.read())["data"][0]["id"] == "chat"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)


def test_canvas_colours_each_token_by_its_commit_step_and_outlines_the_latest(live):
    import torch

    from ldm.sampling.render import TokenPieces
    from ldm.sampling.sampler import SamplerStep
    from ldm.serve.canvas import CommitTracker, canvas_html
    from ldm.sampling.prompts import encode_text

    mask = live.tok.mask_token_id
    a, c = encode_text(live.tok, " king river")[:2]
    tracker = CommitTracker()
    first = torch.tensor([[a, mask, mask]])
    tracker.update(SamplerStep(0, 0, first, torch.tensor([[True, False, False]]), 1))
    second = torch.tensor([[a, mask, c]])
    born = tracker.update(SamplerStep(1, 0, second, torch.tensor([[False, False, True]]), 2))
    html = canvas_html(TokenPieces(live.tok), second[0].tolist(), mask_id=mask,
                       born=born[0].tolist(), new=[False, False, True], total_steps=3)
    assert 'data-committed="2" data-masked="1"' in html
    eos = live.tok.eos_token_id
    padded = canvas_html(TokenPieces(live.tok), [a, eos, mask], mask_id=mask, eos_id=eos)
    assert 'data-committed="2"' in padded and "∎" in padded  # committed EOS padding shows
    done = canvas_html(TokenPieces(live.tok), [a, eos, mask], mask_id=mask, eos_id=eos,
                       end_id=eos, state="done")
    assert 'data-committed="1" data-masked="0"' in done  # a finished answer ends at its EOS
    assert html.count('title="step 1"') == 1 and html.count('title="step 2"') == 1
    assert html.count("ldm-new") == 1 and html.index("ldm-new") > html.index('title="step 1"')
    assert html.count('class="ldm-mask"') == 1
