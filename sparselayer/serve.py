"""Old import path of `sparselayer serve`: the server lives in `sparselayer.sync.server`."""
from .sync.server import serve  # noqa: F401
