"""What clients see: the websocket hub, the FastAPI app (websockets, REST, metrics) and the live page.

Imports no model code (no torch, onnxruntime, umap, numba): the bridge only sees results.
"""

from .app import RunCatalog, TiledConfig, create_app
from .hub import Hub
from .wire import ModelInfo, WireFormat

__all__ = ["Hub", "ModelInfo", "RunCatalog", "TiledConfig", "WireFormat", "create_app"]
