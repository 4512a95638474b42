"""The bridge to tpu-mlir, host side: where its venv is, the fork server its Python tools run in, and what their
logs say. ``guest/`` holds the scripts that run inside that venv."""
