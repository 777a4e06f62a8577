"""rnnkit: PyTorch's recurrent layers, rebuilt in Python — exact, fast and extensible.

``LSTM``, ``GRU``, ``RNN`` and their cells are drop-ins for ``torch.nn``'s (same constructor,
parameters, init, ``state_dict``, shapes, errors); the recurrence runs on rnnkit's engines,
chosen per call by ``rnnkit.functional.select_engine``.
"""

from rnnkit import functional
from rnnkit.cell_modules import GRUCell, LSTMCell, RNNCell, RNNCellBase
from rnnkit.convert import convert, revert
from rnnkit.modules import GRU, LSTM, RNN, RNNBase

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
    "revert",
]
__version__ = "0.1.0"
