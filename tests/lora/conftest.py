"""The adapter lifecycle fixtures (defined in fixtures.py, shared with tests/api)."""

from tests.lora.fixtures import base_info, engine, factory, make_registry, root

__all__ = ["base_info", "engine", "factory", "make_registry", "root"]
