from tests.server.conftest import tiny_ckpt  # noqa: F401 (the tiny chat checkpoint, as a fixture here)
