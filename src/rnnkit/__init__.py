"""rnnkit: PyTorch's recurrent layers, rebuilt in Python — exact, fast and extensible.

``LSTM``, ``GRU``, ``RNN`` and their cells are drop-ins for ``torch.nn``'s (same constructor,
parameters, init, ``state_dict``, shapes, errors); the recurrence runs on rnnkit's engines,
chosen per call by ``rnnkit.functional.select_engine``. ``rnnkit.onnx.export`` exports models
that hold them to ONNX (imported on first use, as it needs the ``onnx`` package); within
``rnnkit.portable()`` they trace as core ATen ops, for runtimes without rnnkit's ops.
"""

import importlib

from rnnkit import functional, modules
from rnnkit.cell_modules import GRUCell, LSTMCell, RNNCell, RNNCellBase
from rnnkit.convert import convert, revert
from rnnkit.modules import GRU, LSTM, RNN, RNNBase
from rnnkit.quantized import quantize_dynamic
from rnnkit.traced import portable

# The compiled ops' schemas, defined now, so that a saved graph that holds them (a
# torch.export program) loads and runs after `import rnnkit`; their kernels are built or
# loaded on first use (engines/cpu/ops.py, build.py).
importlib.import_module("rnnkit.engines.cpu")

__all__ = [
    "GRU",
    "GRUCell",
    "LSTM",
    "LSTMCell",
    "RNN",
    "RNNBase",
    "RNNCell",
    "RNNCellBase",
    "convert",
    "functional",
    "onnx",
    "portable",
    "quantize_dynamic",
    "revert",
]
__version__ = "0.1.0"


def _export_traced_layer(layer, input, hx, lengths):
    # rnnkit.onnx imports onnx: loaded when torch.onnx.export first traces a layer
    from rnnkit.onnx import export_traced_layer

    return export_traced_layer(layer, input, hx, lengths)


modules.onnx_traced_call = _export_traced_layer


def __getattr__(name: str):
    # rnnkit.onnx imports onnx: load it on first use, not with rnnkit
    if name == "onnx":
        return importlib.import_module("rnnkit.onnx")
    raise AttributeError(f"module 'rnnkit' has no attribute {name!r}")
