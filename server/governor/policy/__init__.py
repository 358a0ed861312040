"""Decoding policy: presets, prompt-template stops and the per-request upstream body builder."""
