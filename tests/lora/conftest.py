"""The adapter lifecycle fixtures (defined in fixtures.py, shared with tests/api) and the S3 server's
(test_objects.py)."""

from tests.lora.fixtures import base_info, engine, factory, make_registry, root
from tests.lora.test_objects import bucket, s3

__all__ = ["base_info", "bucket", "engine", "factory", "make_registry", "root", "s3"]
