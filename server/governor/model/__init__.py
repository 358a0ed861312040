"""The model's files: where a model's files are (``files.py``: a local folder or the hub cache) and the
embedded default model, converted once from its GGUF (``embedded.py``).
"""
