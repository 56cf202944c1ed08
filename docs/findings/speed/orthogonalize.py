"""Time torch.optim.Muon's Newton-Schulz iteration (bf16) against lmforge/training/muon.py's in fp32, on the default
pretrain model's 28 hidden matrices: `python docs/findings/speed/orthogonalize.py > docs/findings/speed/orthogonalize.txt`."""
import platform
import time

import torch
import torch.optim._muon as torch_muon

from lmforge.runtime import cpu_flags
from lmforge.training.muon import NS_COEFFICIENTS, orthogonalize

shapes = [(256, 256)] * 16 + [(704, 256)] * 8 + [(256, 704)] * 4  # q, k, v, o; gate, up; down (4 layers)
grads = [torch.randn(*s) for s in shapes]


def best(f, repeats=3):
    f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return min(times)


one = grads[16]
print(f"cpu: {platform.processor() or platform.machine()}, flags: {sorted(cpu_flags())}, torch threads: {torch.get_num_threads()}")
print(f"one 704x256 matrix, torch (bf16): {1000 * best(lambda: torch_muon._zeropower_via_newtonschulz(one, NS_COEFFICIENTS, 5, 1e-7)):.1f} ms")
print(f"one 704x256 matrix, lmforge (fp32): {1000 * best(lambda: orthogonalize(one)):.1f} ms")
print(f"28 matrices, torch (bf16): {best(lambda: [torch_muon._zeropower_via_newtonschulz(g, NS_COEFFICIENTS, 5, 1e-7) for g in grads]):.2f} s")
print(f"28 matrices, lmforge (fp32): {best(lambda: [orthogonalize(g) for g in grads]):.3f} s")
