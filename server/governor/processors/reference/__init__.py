"""The first, per-row Python implementations of Governor's processors, kept as references.

Each keeps a host-side index per request and builds index lists on the host every step. They are
simple to read and were checked against text-generation-webui's DRY and HF's n-gram/penalty rules;
the batched processors one level up are tested to produce the same logits as these, and
`governor bench processors --synthetic --reference` times them.
"""
