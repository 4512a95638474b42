"""tpugraph serve: an OpenAI-compatible HTTP server over the runtime (FastAPI and uvicorn, the `serve` extra)."""
