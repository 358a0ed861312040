"""Engine-side anti-loop logits processors (vLLM v1 plugins) and their per-request settings.

Nothing is imported here on purpose: ``extra_args`` must stay importable by the HTTP layer without
pulling in torch or vLLM, while the processor modules are loaded by vLLM via
``--logits-processors governor.processors.<module>:<Class>``.
"""
