"""task=serve's OpenAI-compatible API, spoken to by the official `openai` client on a live server;
batched answers against answers alone; the page, the API and task=sample answering alike.

Layer: unit, the OpenAI-compatible API served in-process on a thread (the page:
test_serve.py; the page in a browser: test_serve_browser.py).
"""

from __future__ import annotations

import json
import threading

import pytest

pytest.importorskip("gradio")
openai = pytest.importorskip("openai")

from test_sample_task import make_export, sample  # noqa: E402
from test_serve import Live  # noqa: E402

SMALL = dict(max_tokens=16, extra_body={"steps": 16, "block_length": 8})


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return make_export(tmp_path_factory.mktemp("api") / "chat", chat=True)


@pytest.fixture(scope="module")
def live(export):
    server = Live(export, title="chat")
    yield server
    server.close()


def client(live, key="none", retries=0):
    return openai.OpenAI(base_url=f"{live.url}v1", api_key=key, timeout=60, max_retries=retries)


def ask(live, text, **kwargs):
    return client(live).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": text}], **{**SMALL, **kwargs})


def library_answer(live, text, **settings):
    """Return (text, model calls) of the library sampler for `text` alone."""
    from ldm.sampling.render import clean_answer
    from ldm.sampling.sampler import generate
    from ldm.sampling.settings import SamplerSettings
    from ldm.tokenizer import encode_chat

    ids = encode_chat(live.tok, [{"role": "user", "content": text}],
                      add_generation_prompt=True)[0]
    batcher = live.batcher
    result = generate(live.base_fn, [ids], SamplerSettings(**settings, max_positions=128),
                      mask_id=batcher.mask_id, eos_id=batcher.eos_id,
                      special_ids=batcher.special_ids, pad_id=batcher.pad_id)
    return clean_answer(live.tok, result.tokens[0], batcher.mask_id, batcher.eos_id), result.nfe


def test_models_lists_the_served_export(live):
    (model,) = client(live).models.list().data
    assert model.id == "chat" and model.owned_by == "ldm"


def test_chat_completion_is_the_library_samplers_answer_with_usage(live):
    reply = ask(live, "the king spoke")
    expected, nfe = library_answer(live, "the king spoke", max_new_tokens=16, steps=16,
                                   block_length=8)
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 0 and usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.model_extra["model_calls"] == nfe


def test_streamed_chunks_add_up_to_the_plain_answer_then_finish_with_usage(live):
    plain = ask(live, "a river of stone", max_tokens=32,
                extra_body={"steps": 32, "block_length": 8})
    chunks = list(client(live).chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "a river of stone"}], stream=True,
        max_tokens=32, extra_body={"steps": 32, "block_length": 8}))
    assert chunks[0].choices[0].delta.role == "assistant"
    texts = [c.choices[0].delta.content for c in chunks[1:-1]]
    assert all(texts) and "".join(texts) == plain.choices[0].message.content
    last = chunks[-1]
    assert last.choices[0].finish_reason == plain.choices[0].finish_reason
    assert last.usage.completion_tokens == plain.usage.completion_tokens
    assert last.usage.model_extra["model_calls"] == plain.usage.model_extra["model_calls"]


def test_stop_strings_cut_the_answer_before_them(live):
    whole = ask(live, "the queen").choices[0].message.content
    assert len(whole) >= 3, whole
    stop = whole[2:4]
    cut = ask(live, "the queen", stop=[stop]).choices[0]
    assert cut.message.content == whole[:whole.index(stop)] and cut.finish_reason == "stop"


@pytest.mark.parametrize("settings, named", [
    (dict(max_tokens=16, extra_body={"block_length": 7}), "block_length=7"),
    (dict(max_tokens=16, extra_body={"steps": 32, "block_length": 8}), "steps=32"),
    (dict(max_tokens=16, extra_body={"preset": "slowest"}), "preset='slowest' is unknown"),
    (dict(max_tokens=16, extra_body={"remasking": "loudest"}), "remasking='loudest'"),
    (dict(max_tokens=16, temperature=-1), "temperature=-1"),
    (dict(max_tokens=16, extra_body={"cache": "dual", "block_length": 8}), "cache"),
    (dict(max_tokens=200), "max_tokens=200"),
    (dict(max_tokens=16, n=2), "n=2"),
])
def test_bad_settings_get_a_400_naming_the_value_and_the_server_keeps_serving(
        live, settings, named):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(live, "hi", **settings)
    assert named in caught.value.body["message"], caught.value.body
    assert caught.value.body["type"] == "invalid_request_error"
    assert ask(live, "still there?").choices[0].message.content is not None


def test_a_prompt_that_does_not_fit_gets_a_400_with_its_length(live):
    with pytest.raises(openai.BadRequestError) as caught:
        ask(live, "the king spoke " * 60)
    body = caught.value.body
    assert body["code"] == "context_length_exceeded" and "128 positions" in body["message"]


def test_wrong_key_gets_a_401_and_the_right_one_an_answer(export, monkeypatch):
    server = Live(export, title="chat", api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError) as caught:
            client(server, key="guess").chat.completions.create(
                model="chat", messages=[{"role": "user", "content": "hi"}], **SMALL)
        assert caught.value.body["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(server, key="guess").models.list()
        assert client(server, key="s3cret").models.list().data[0].id == "chat"
    finally:
        server.close()


def test_concurrent_greedy_requests_share_one_batch_and_answer_as_alone(live):
    texts = ["the king", "a long river of night and day", "speak", "fair lady of the house",
             "war", "good answer ask tell"]
    alone = [ask(live, t).choices[0].message.content for t in texts]
    batches = live.batcher.stats["batches"]
    together = [None] * len(texts)
    start = threading.Barrier(len(texts))

    def one(i):
        start.wait()
        together[i] = ask(live, texts[i]).choices[0].message.content

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(texts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert together == alone
    assert live.batcher.stats["batches"] - batches < len(texts)  # some shared a canvas
    assert live.batcher.stats["largest"] > 1


@pytest.mark.parametrize("preset", ["llada", "fast", "fast_dual"])
def test_batched_generate_answers_each_request_as_it_is_answered_alone(export, preset):
    # In-process, with the model's layers visible to the sampler (the block cache needs them).
    import queue

    from conftest import CONF
    from ldm.model import load_model
    from ldm.sampling import sampler_model
    from ldm.sampling.decode import chat_banned_ids
    from ldm.serve.batcher import Batcher, Job
    from ldm.serve.settings import load_presets, page_sampler
    from ldm.tokenizer import encode_chat, load_tokenizer

    tok = load_tokenizer(str(export))
    model = load_model("export", str(export), dtype="float32", attn_implementation="sdpa",
                       trust_remote_code=False).eval()
    settings = page_sampler(load_presets(CONF / "sampler"), preset, max_new_tokens=16,
                            max_positions=128)
    prompts = [encode_chat(tok, [{"role": "user", "content": t}], add_generation_prompt=True)[0]
               for t in ("the king", "night and day and the river", "ask", "lord of war")]

    def answers(window_s, together):
        batcher = Batcher(sampler_model(model), tok, mask_id=tok.mask_token_id,
                          special_ids=chat_banned_ids(tok), window_s=window_s)
        out = []
        try:
            boxes = [queue.Queue() for _ in prompts]
            jobs = [Job(p, settings, lambda kind, payload, box=box: box.put((kind, payload)))
                    for p, box in zip(prompts, boxes)]
            for job, box in zip(jobs, boxes):
                batcher.submit(job)
                if not together:
                    out.append(done(box))
            if together:
                out = [done(box) for box in boxes]
            return out, batcher.stats
        finally:
            batcher.close()

    def done(box):
        pieces = []
        while True:
            kind, payload = box.get(timeout=120)
            if kind == "text":
                pieces.append(payload)
            elif kind == "done":
                assert "".join(pieces) == payload["text"]  # streamed = whole
                return payload["text"], payload["finish_reason"], payload["completion_tokens"]
            else:
                raise payload

    alone, alone_stats = answers(0.0, together=False)
    batched, stats = answers(1.0, together=True)
    assert alone_stats["largest"] == 1 and stats["batches"] == 1 and stats["largest"] == 4
    assert batched == alone


def test_page_api_and_task_sample_give_the_same_answer_four_times(live, export, tmp_path):
    prompt = "the king spoke to the queen"
    _, records = sample(tmp_path, export, f"prompt={prompt}")
    (record,) = records
    expected = record["answer"] if "answer" in record else record["text"]
    page = live.client()
    for _ in range(4):
        shown = page.predict(message=prompt, max_new_tokens=16, steps=16, block_length=16,
                             api_name="/chat")[0]
        assert shown[-1]["content"][0]["text"] == (expected or "(empty answer)")
        api = ask(live, prompt, max_tokens=16, extra_body={"steps": 16, "block_length": 16})
        assert api.choices[0].message.content == expected


def test_the_page_sends_what_it_shows(export):
    server = Live(export, title="chat", multi_turn=False)
    try:
        page = server.client()
        first = page.predict(message="hello there", send_conversation=False, max_new_tokens=16,
                             steps=16, block_length=16, api_name="/chat")[0]
        second = page.predict(message="and then?", conversation=first,
                              send_conversation=False, max_new_tokens=16, steps=16,
                              block_length=16, api_name="/chat")[0]
        assert server.prompts[-1] == [{"role": "user", "content": "and then?"}]
        assert [m["role"] for m in second] == ["user", "assistant"]  # a new conversation
        alone = page.predict(message="and then?", max_new_tokens=16, steps=16, block_length=16,
                             send_conversation=False, api_name="/chat")[0]
        assert second == alone
        # With the conversation sent, the model gets exactly the visible turns, edits included.
        edited = [first[0], {"role": "assistant",
                             "content": [{"type": "text", "text": "an answer I wrote"}]}]
        page.predict(message="why?", conversation=edited, send_conversation=True,
                     max_new_tokens=16, steps=16, block_length=16, api_name="/chat")
        assert server.prompts[-1] == [{"role": "user", "content": "hello there"},
                                      {"role": "assistant", "content": "an answer I wrote"},
                                      {"role": "user", "content": "why?"}]
    finally:
        server.close()


def test_export_records_whether_its_sft_data_had_multi_turn_conversations(export, tmp_path):
    from ldm.data.sft import build_sft_data
    from ldm.export import conversation_turns, read_export
    from ldm.tokenizer import load_tokenizer

    single = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]
              for i in range(20)]
    multi = [*single, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                       {"role": "user", "content": "and?"}, {"role": "assistant", "content": "b"}]]
    found = {}
    for name, convs in (("single", single), ("multi", multi)):
        for padding in ("eos", "batch"):
            folder = tmp_path / f"{name}-{padding}"
            build_sft_data(lambda c=convs: iter(c), folder, tokenizer=load_tokenizer(str(export)),
                           context_length=64, test_split_pct=0.3, split_seed=0, padding=padding,
                           progress=False)
            found[name, padding] = conversation_turns(folder)
    assert found["single", "eos"] == found["single", "batch"] == {"most_user_turns": 1,
                                                                   "multi_turn": False}
    assert found["multi", "eos"] == found["multi", "batch"] == {"most_user_turns": 2,
                                                                 "multi_turn": True}
    info = json.loads((export / "ldm_export.json").read_text())
    assert read_export(str(export)).multi_turn is None  # no data recorded: unknown
    copy = tmp_path / "export"
    import shutil

    shutil.copytree(export, copy)
    (copy / "ldm_export.json").write_text(json.dumps({**info, "data": str(tmp_path / "single-eos")}))
    assert read_export(str(copy)).multi_turn is False  # derived from the data folder it names
    from ldm.export import write_export

    model = read_export(str(export)).load_model()
    written = write_export(model, load_tokenizer(str(export)), tmp_path / "written", "model: x\n",
                           {"data": str(tmp_path / "multi-batch")})
    recorded = json.loads((written / "ldm_export.json").read_text())["conversations"]
    assert recorded == {"most_user_turns": 2, "multi_turn": True}
    assert read_export(str(written)).multi_turn is True
