"""The compiled ops' schemas, defined at ``import rnnkit``, before any kernel is built.

A graph that holds the ops (a ``torch.export`` program saved and loaded in a fresh process, a
``torch.compile`` cache) resolves them as soon as rnnkit is imported: the schemas, the fake
implementations that tracers run (``fake.py``) and the batching rules of ``torch.func.vmap``
(``func.py``) are all Python. The C++ library (``csrc/``) registers the CPU kernels alone,
when ``build.py`` loads it; until then ``build.py``'s stand-in kernel builds or loads it.
"""

from __future__ import annotations

import torch

from rnnkit.engines.cpu import fake, func

__all__ = ["NAMES", "NAMESPACE", "SCHEMAS", "UNIFORM", "op_batch_sizes"]

NAMESPACE = "rnnkit_cpu"

SCHEMAS = (
    "layer_forward(int mode, Tensor x, Tensor h0, Tensor? c0, Tensor[] weights, "
    "int[] batch_sizes, bool has_bias, bool train, Tensor? restart=None) -> Tensor[]",
    "layer_backward(int mode, Tensor grad_out, Tensor grad_hn, Tensor? grad_cn, Tensor x, "
    "Tensor h0, Tensor? c0, Tensor[] weights, Tensor out, Tensor[] saved, int[] batch_sizes, "
    "bool has_bias, bool need_dx, bool reuse_saved, Tensor? restart=None) -> Tensor[]",
    "lstm_variant_forward(Tensor gx, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_hh, "
    "Tensor? w_hr, Tensor? peephole, Tensor? ln_hh, Tensor? ln_c_weight, Tensor? ln_c_bias, "
    "Tensor? rec_mask, Tensor? keep_h, Tensor? keep_c, float[] rates, bool coupled, "
    "int[] batch_sizes, bool reverse, bool train, Tensor? restart=None) -> Tensor[]",
    "lstm_variant_backward(Tensor grad_out, Tensor grad_hn, Tensor grad_cn, Tensor out, "
    "Tensor[] saved, Tensor h0, Tensor c0, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, "
    "Tensor? peephole, Tensor? ln_hh, Tensor? ln_c_weight, Tensor? ln_c_bias, "
    "Tensor? rec_mask, Tensor? keep_h, Tensor? keep_c, float[] rates, bool coupled, "
    "int[] batch_sizes, bool reverse, Tensor? restart=None) -> Tensor[]",
)
# Uniform input's ``batch_sizes`` as the ops take them: one -1 (no step's batch is negative).
# An empty list would say the same, but AOTInductor's proxy executor, which calls the ops from
# a compiled package, reads an empty ``int[]`` argument back as None.
UNIFORM = (-1,)


def op_batch_sizes(batch_sizes) -> list[int]:
    """The driver's ``batch_sizes`` (empty for uniform input) as the ops take them."""
    return list(batch_sizes) if batch_sizes else list(UNIFORM)


NAMES = tuple(schema[: schema.index("(")] for schema in SCHEMAS)

# The library lives as long as the process: dropping it would unregister the definitions.
_DEF = torch.library.Library(NAMESPACE, "DEF")
for _schema in SCHEMAS:
    _DEF.define(_schema)
fake.register(NAMESPACE)
func.register(NAMESPACE)
