r"""Streaming: a long sequence chunk by chunk, or one step at a time, carrying the state.

A unidirectional layer's final state ``h_n`` (``(h_n, c_n)`` for LSTM) is the initial state
that the next chunk of the sequence starts from, for every layer at once; so running chunks in
turn, each with the previous chunk's state, equals running the whole sequence, forward and
backward (the states stay in the autograd graph; :func:`detach_state` cuts it, for truncated
backpropagation through time). :meth:`rnnkit.RNNBase.step` runs one time step of ``[N, H_in]``
input, for online inference.

Equal means within rounding on every engine: a chunk's input projection is one matrix product
over its steps, and BLAS may sum a row in another order for another number of rows. It holds in
eval mode, or with the variants that draw random masks in training turned off: inter-layer
``dropout``, ``zoneout``, ``recurrent_dropout`` (one mask per call) and ``weight_dropout`` (one
mask per call) draw new masks for every chunk. A bidirectional layer has no streaming form: its
reverse direction starts from the end of the whole sequence.

Examples::

    >>> lstm = rnnkit.LSTM(10, 20, num_layers=2).eval()
    >>> x = torch.randn(100, 3, 10)  # [L, N, H_in]
    >>> whole, _ = lstm(x)
    >>> hx, chunks = None, []
    >>> for chunk in x.split(32):  # any sizes
    ...     out, hx = lstm(chunk, hx)
    ...     chunks.append(out)
    >>> torch.allclose(torch.cat(chunks), whole, atol=1e-6)
    True
    >>> out_t, hx = lstm.step(torch.randn(3, 10), hx)  # one more step: [N, H_in] -> [N, H_out]
    >>> out_t.shape
    torch.Size([3, 20])
"""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["detach_state", "step"]

State = Tensor | tuple[Tensor, Tensor]


def detach_state(hx: State | None) -> State | None:
    """``hx`` (``h`` or ``(h, c)``) cut from the autograd graph: the state carried to the next
    chunk in truncated backpropagation through time."""
    if hx is None:
        return None
    if isinstance(hx, tuple):
        return tuple(t.detach() for t in hx)
    return hx.detach()


def step(
    module: nn.Module, input: Tensor, hx: State | None = None, reset: Tensor | None = None
) -> tuple[Tensor, State]:
    """One time step of a unidirectional layer: ``module`` on a length-1 sequence.

    ``input`` is ``[N, H_in]`` (or ``[H_in]`` unbatched), whatever ``batch_first`` says;
    returns ``(output_t, hx)``, ``output_t`` ``[N, H_out]`` (or ``[H_out]``) and the new state
    shaped as ``module``'s ``h_n`` (``(h_n, c_n)``). ``reset`` (bool ``[N]``; 0-D unbatched)
    starts the sequences where it is true over from zeros (:mod:`rnnkit.resets`). Forward
    hooks run, as on any call.
    """
    name = type(module).__name__
    if module.bidirectional:
        raise ValueError(
            f"{name}.step runs one time step forward, but this {name} is bidirectional: its "
            "reverse direction needs the whole sequence; call the module on it instead"
        )
    if not isinstance(input, Tensor):
        raise TypeError(f"{name}.step: input must be a Tensor, got {type(input).__name__}")
    if input.dim() not in (1, 2):
        raise ValueError(
            f"{name}.step: expected input to be 2-D [N, H_in] or 1-D [H_in] (one time step), "
            f"got {input.dim()}-D"
        )
    # the time dimension of a batched sequence follows batch_first; an unbatched one is [L, H_in]
    time_dim = 1 if module.batch_first and input.dim() == 2 else 0
    if reset is None:
        output, hx = module(input.unsqueeze(time_dim), hx)
        return output.squeeze(time_dim), hx
    want = list(input.shape[:1]) if input.dim() == 2 else []
    if isinstance(reset, Tensor) and list(reset.shape) != want:
        legend = "[N]" if want else "0-D (unbatched input)"
        raise RuntimeError(
            f"{name}.step: reset must have shape {legend} = {want} to match the input, got "
            f"{list(reset.shape)}"
        )
    reset = reset.unsqueeze(time_dim) if isinstance(reset, Tensor) else reset
    output, hx = module(input.unsqueeze(time_dim), hx, reset=reset)
    return output.squeeze(time_dim), hx
