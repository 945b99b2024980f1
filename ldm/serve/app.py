"""The Gradio page: chat with a live canvas, settings, side by side, infill, stop and clear.

Each request is a generator over the engine's frames, so the page redraws the canvas after every
sampler step. Requests queue (`concurrency` model runs at once); a request's runs stop when its
stop button is pressed or its tab is closed. The chat sends what it shows: the visible
conversation (the `/chat` endpoint's `conversation`) is the history, or, with "send the
conversation so far" off (the start for a model trained on single-turn data), each message starts
a new conversation and goes alone.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

import gradio as gr

from ldm.errors import LdmError
from ldm.serve.canvas import CSS, empty_canvas
from ldm.serve.engine import Engine, user_message
from ldm.serve.settings import PAGE_FIELDS, page_sampler, page_settings, preset_values

REMASKING = ["low_confidence", "random", "margin", "entropy"]
INFILL_EXAMPLE = "The king [MASK:4] to the queen [MASK:3]."
EMPTY_ANSWER = "(empty answer)"  # what the bubble shows for an empty answer; sent back as ""
SINGLE_TURN_NOTE = ("This model was trained on single-turn conversations: each message starts a "
                    "new conversation and is sent alone. Tick *Send the conversation so far* to "
                    "send earlier turns anyway.")


def message_text(content: Any) -> str:
    """Return the text of a chat message's content (a string or Gradio's list of parts)."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", ""))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return "" if content is None else str(content)


def shown_history(conversation: Optional[List[Any]]) -> List[Dict[str, str]]:
    """Return the visible conversation as the {role, content} messages the model is sent."""
    out = []
    for message in conversation or []:
        get = message.get if isinstance(message, dict) else \
            (lambda key, m=message: getattr(m, key, None))
        role, text = get("role"), message_text(get("content"))
        if role not in ("user", "assistant"):
            continue
        out.append({"role": role, "content": "" if role == "assistant" and text == EMPTY_ANSWER
                    else text})
    return out


def _session(request: Optional[gr.Request]) -> Optional[str]:
    return getattr(request, "session_hash", None)


def _settings(engine: Engine, presets: Dict[str, Any], preset: str, values: List[Any]):
    try:
        return page_sampler(presets, preset, dict(zip(PAGE_FIELDS, values)),
                            max_positions=engine.max_positions)
    except LdmError as err:
        raise gr.Error(user_message(err), print_exception=False) from None


def build_app(engine: Engine, presets: Dict[str, Any], default_preset: str, *,
              title: str = "ldm", concurrency: int = 1, max_queue: int = 32,
              multi_turn: Optional[bool] = None) -> gr.Blocks:
    """Return the page (a gr.Blocks with its queue set) serving `engine`.

    `multi_turn` is whether the model's SFT data had multi-turn conversations (None: unknown);
    with False the chat starts with each message sent alone, and says so.
    """
    names = list(presets)
    start = page_settings(preset_values(presets, default_preset))
    other = next((n for n in names if n != default_preset and n == "fast"),
                 next((n for n in names if n != default_preset), default_preset))

    with gr.Blocks(title=f"ldm · {title}", analytics_enabled=False) as demo:
        gr.Markdown(f"## ldm · `{title}`\nA masked diffusion LM writes its answer by unmasking: "
                    "grey boxes are still masked, each token is coloured by the step that "
                    "committed it (blue early, amber late), outlined tokens were committed by the "
                    "latest step.")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                        note = SINGLE_TURN_NOTE if multi_turn is False else ""
                        gr.Markdown(note, elem_id="chat-note", visible=bool(note))
                        chatbot = gr.Chatbot(label="Conversation", height=300, elem_id="chatbot")
                        canvas = gr.HTML(empty_canvas("the answer appears here, step by step"),
                                         elem_id="chat-canvas")
                        stats = gr.Markdown(elem_id="chat-stats")
                        with gr.Row():
                            message = gr.Textbox(show_label=False, scale=5, elem_id="chat-input",
                                                 placeholder="Ask something and press Enter")
                            send = gr.Button("Send", variant="primary", scale=1,
                                             elem_id="chat-send")
                        with gr.Row():
                            stop = gr.Button("Stop", elem_id="chat-stop")
                            clear = gr.Button("Clear conversation", elem_id="chat-clear")
                            send_conversation = gr.Checkbox(
                                multi_turn is not False, label="Send the conversation so far",
                                info="off: each message starts a new conversation",
                                elem_id="chat-send-conversation")
                    with gr.Tab("Side by side", id="side", elem_id="tab-side"):
                        side_prompt = gr.Textbox(label="Prompt", elem_id="side-input")
                        with gr.Row():
                            preset_a = gr.Dropdown(names, value=default_preset, label="Left")
                            preset_b = gr.Dropdown(names, value=other, label="Right")
                            side_new = gr.Number(start["max_new_tokens"], precision=0,
                                                 label="Max new tokens")
                        with gr.Row():
                            side_run = gr.Button("Sample both", variant="primary",
                                                 elem_id="side-run")
                            side_stop = gr.Button("Stop", elem_id="side-stop")
                        with gr.Row():
                            with gr.Column():
                                canvas_a = gr.HTML(empty_canvas(), elem_id="side-canvas-a")
                                stats_a = gr.Markdown(elem_id="side-stats-a")
                            with gr.Column():
                                canvas_b = gr.HTML(empty_canvas(), elem_id="side-canvas-b")
                                stats_b = gr.Markdown(elem_id="side-stats-b")
                    with gr.Tab("Infill", id="infill", elem_id="tab-infill"):
                        infill_text = gr.Textbox(INFILL_EXAMPLE, label="Text with [MASK:N] spans",
                                                 elem_id="infill-input")
                        with gr.Row():
                            infill_run = gr.Button("Fill in", variant="primary",
                                                   elem_id="infill-run")
                            infill_stop = gr.Button("Stop", elem_id="infill-stop")
                        infill_canvas = gr.HTML(empty_canvas(), elem_id="infill-canvas")
                        infill_out = gr.Textbox(label="Filled text", elem_id="infill-output")
                        infill_stats = gr.Markdown(elem_id="infill-stats")
            with gr.Column(scale=1, min_width=260):
                gr.Markdown("### Settings")
                preset = gr.Dropdown(names, value=default_preset, label="Sampler preset",
                                     elem_id="preset")
                fields = {
                    "max_new_tokens": gr.Number(start["max_new_tokens"], precision=0,
                                                label="Max new tokens"),
                    "steps": gr.Number(start["steps"], precision=0, label="Steps"),
                    "block_length": gr.Number(start["block_length"], precision=0,
                                              label="Block length"),
                    "threshold": gr.Slider(0, 1, start["threshold"], step=0.01,
                                           label="Confidence threshold (0 = off)"),
                    "temperature": gr.Slider(0, 2, start["temperature"], step=0.05,
                                             label="Temperature (0 = greedy)"),
                    "top_p": gr.Slider(0, 1, start["top_p"], step=0.01, label="Top-p (1 = off)"),
                    "cfg_scale": gr.Slider(0, 5, start["cfg_scale"], step=0.1,
                                           label="Guidance scale (0 = off)"),
                    "remasking": gr.Dropdown(REMASKING, value=start["remasking"],
                                             label="Remasking"),
                }
                settings = [fields[k] for k in PAGE_FIELDS]

        def on_preset(name):
            try:
                values = page_settings(preset_values(presets, name))
            except LdmError as err:
                raise gr.Error(user_message(err), print_exception=False) from None
            return [values[k] for k in PAGE_FIELDS]

        def on_chat(message, conversation, send_conversation, preset, max_new_tokens, steps,
                    block_length, threshold, temperature, top_p, cfg_scale, remasking,
                    request: gr.Request = None):
            text = (message or "").strip()
            if not text:
                raise gr.Error("write a message first", print_exception=False)
            settings = _settings(engine, presets, preset, [
                max_new_tokens, steps, block_length, threshold, temperature, top_p, cfg_scale,
                remasking])
            # What the page shows is what the model is sent: the visible conversation, or, when
            # each message starts a new conversation, the message alone (and only it is shown).
            past = shown_history(conversation) if send_conversation else []
            messages = [*past, {"role": "user", "content": text}]
            shown = [*messages, {"role": "assistant", "content": "…"}]
            try:
                for frame in engine.answer(messages, [settings], _session(request)):
                    if not frame.done:
                        yield shown, frame.html, frame.stats, ""
                        continue
                    shown[-1] = {"role": "assistant", "content": frame.text or EMPTY_ANSWER}
                    yield shown, frame.html, frame.stats, ""
            except LdmError as err:
                raise gr.Error(user_message(err), print_exception=False) from None

        def on_side(prompt, left, right, max_new_tokens, request: gr.Request = None):
            text, name_a, name_b = (prompt or "").strip(), left, right
            if not text:
                raise gr.Error("write a prompt first", print_exception=False)
            try:
                runs = [page_sampler(presets, n, max_new_tokens=max_new_tokens,
                                     max_positions=engine.max_positions)
                        for n in (name_a, name_b)]
                out = [empty_canvas(), "", empty_canvas(), ""]
                for frame in engine.answer([{"role": "user", "content": text}], runs,
                                           _session(request)):
                    out[2 * frame.index] = frame.html
                    label = (name_a, name_b)[frame.index]
                    out[2 * frame.index + 1] = f"**{label}** · {frame.stats}"
                    yield tuple(out)
            except LdmError as err:
                raise gr.Error(user_message(err), print_exception=False) from None

        def on_infill(text, preset, max_new_tokens, steps, block_length, threshold, temperature,
                      top_p, cfg_scale, remasking, request: gr.Request = None):
            settings = _settings(engine, presets, preset, [
                max_new_tokens, steps, block_length, threshold, temperature, top_p, cfg_scale,
                remasking])
            try:
                for frame in engine.fill(text or "", settings, _session(request)):
                    yield frame.html, frame.text or "", frame.stats
            except LdmError as err:
                raise gr.Error(user_message(err), print_exception=False) from None

        def on_stop(request: gr.Request = None):
            engine.stop(_session(request))

        def on_clear():
            return [], empty_canvas("the answer appears here, step by step"), "", ""

        preset.change(on_preset, preset, settings, api_name="preset", queue=False)
        chat_inputs = [message, chatbot, send_conversation, preset, *settings]
        chat_outputs = [chatbot, canvas, stats, message]
        send.click(on_chat, chat_inputs, chat_outputs, api_name="chat")
        message.submit(on_chat, chat_inputs, chat_outputs, api_name=False)
        side_run.click(on_side, [side_prompt, preset_a, preset_b, side_new],
                       [canvas_a, stats_a, canvas_b, stats_b], api_name="side_by_side")
        infill_run.click(on_infill, [infill_text, preset, *settings],
                         [infill_canvas, infill_out, infill_stats], api_name="infill")
        stop.click(on_stop, None, None, api_name="stop", queue=False)
        for button in (side_stop, infill_stop):
            button.click(on_stop, None, None, api_name=False, queue=False)
        clear.click(on_clear, None, [chatbot, canvas, stats, message], api_name="clear",
                    queue=False)
        demo.unload(on_stop)  # a closed tab stops its runs
    demo.queue(default_concurrency_limit=concurrency, max_size=max_queue)
    return demo


def theme():
    """Return the page theme, with system fonts so the page needs nothing from the internet."""
    return gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                             font_mono=["ui-monospace", "monospace"])


def mount(app, demo: gr.Blocks, host: str, port: int):
    """Return `app` (the API's FastAPI app) with the page mounted at / beside its routes."""
    return gr.mount_gradio_app(app, demo, path="/", server_name=host, server_port=port,
                               footer_links=["api"], show_error=True, ssr_mode=False,
                               theme=theme(), css=CSS)


def launch(demo: gr.Blocks, host: str, port: int):
    """Start serving `demo` on host:port in the background; return (app, local url) once it listens."""
    app, url, _ = demo.launch(server_name=host, server_port=port, prevent_thread_lock=True,
                              share=False, quiet=True, ssr_mode=False, show_error=True,
                              theme=theme(), css=CSS, footer_links=["api"])
    return app, url
