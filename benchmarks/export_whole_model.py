"""Run times of one exported model: eager (the fused engine) against its AOTInductor package and
onnxruntime running its ``torch.onnx.export(dynamo=True)`` export, at three sizes.

The model is Embedding(100, 16) -> rnnkit.LSTM(16, 32, 2 layers, proj_size=8, bidirectional,
batch_first) -> Linear(16, 5), exported with the batch and length symbolic. Medians of 30
calls under ``torch.no_grad()``, milliseconds, with the largest difference from eager. Needs
onnxruntime and onnxscript (``pip install -e ".[test]"``). Run::

    python benchmarks/export_whole_model.py
"""

import logging
import statistics
import tempfile
import time
import warnings

import onnxruntime as ort
import torch
from torch.export import Dim

import rnnkit

# torch.export and the exporter log and warn at length; the numbers are what matter here
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

torch.manual_seed(0)
work = tempfile.mkdtemp()


class Tagger(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(100, 16)
        self.lstm = rnnkit.LSTM(16, 32, 2, proj_size=8, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(16, 5)

    def forward(self, tokens):
        return self.head(self.lstm(self.embed(tokens))[0])


m = Tagger().eval()
dims = {"tokens": {0: Dim("N"), 1: Dim("L")}}
ex = (torch.randint(0, 100, (3, 10)),)
prog = torch.onnx.export(m, ex, dynamo=True, dynamic_shapes=dims, verbose=False)
prog.save(f"{work}/tagger.onnx")
so = ort.SessionOptions()
so.intra_op_num_threads = torch.get_num_threads()
sess = ort.InferenceSession(f"{work}/tagger.onnx", so, providers=["CPUExecutionProvider"])
with torch.no_grad():
    ep = torch.export.export(m, ex, dynamic_shapes=dims)
    pkg = torch._inductor.aoti_load_package(
        torch._inductor.aoti_compile_and_package(ep, package_path=f"{work}/tagger.pt2")
    )


def t(fn, reps):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - a)
    return statistics.median(ts) * 1e3


print("threads", torch.get_num_threads(), "onnxruntime", ort.__version__)
for N, L in [(1, 50), (8, 100), (32, 200)]:
    x = torch.randint(0, 100, (N, L))
    with torch.no_grad():
        e = t(lambda x=x: m(x), 30)
        a = t(lambda x=x: pkg(x), 30)
        err_a = float((pkg(x) - m(x)).abs().max())
    o = t(lambda x=x: sess.run(None, {"tokens": x.numpy()}), 30)
    err_o = float(abs(sess.run(None, {"tokens": x.numpy()})[0] - m(x).detach().numpy()).max())
    print(
        f"N{N}-L{L}: eager {e:.2f} ms, AOTInductor {a:.2f} ms (max err {err_a:.1e}), onnxruntime {o:.2f} ms (max err {err_o:.1e})"
    )
