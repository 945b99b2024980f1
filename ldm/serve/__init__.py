"""The web demo (task=serve): a Gradio page that chats with an export and shows the canvas denoise.

`engine.py` runs the library's sampler (`generate`, `infill`) with its per-step callback and
streams the steps; `canvas.py` draws a step as HTML; `settings.py` reads the sampler presets and
checks a page's settings; `app.py` lays out the page. Gradio is imported by `app.py` alone.
"""
