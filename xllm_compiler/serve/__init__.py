"""xllm-serve: an OpenAI-compatible HTTP server over a compiled artifact (FastAPI on uvicorn).

``app.build_app`` wires the model's step-level scheduler to the HTTP handlers through one engine thread
(``engine_loop``); ``cli`` is the command. Imported only by the server: the core never needs FastAPI.
"""
