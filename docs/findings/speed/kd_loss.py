"""Time distill's loss, the written-out gradient (tasks/distill.py) against autograd's F.kl_div + F.cross_entropy,
on a student step's shapes (8 x 128 tokens, SmolLM2's 49,152-token vocabulary, hidden size 256); the head's matmul
and cross-entropy alone for scale: `python docs/findings/speed/kd_loss.py > docs/findings/speed/kd-loss.txt`."""
import platform
import time

import torch
import torch.nn.functional as F

from lmforge.config import DistillConfig
from lmforge.runtime import cpu_flags
from tasks.distill import distill_loss

VOCAB, TOKENS = 49152, 8 * 128
cfg = DistillConfig()  # forward KL, kd_weight 0.5, temperature 1: the default


def autograd_form(s, t, y):
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return cfg.kd_weight * kl + (1 - cfg.kd_weight) * F.cross_entropy(s, y)


torch.manual_seed(0)
hidden, head = torch.randn(TOKENS, 256), torch.randn(VOCAB, 256).requires_grad_(True)
teacher, targets = torch.randn(TOKENS, VOCAB), torch.randint(0, VOCAB, (TOKENS,))
forms = {"head + cross-entropy alone": lambda s: F.cross_entropy(s, targets),
         "head + F.kl_div + F.cross_entropy (autograd)": lambda s: autograd_form(s, teacher, targets),
         "head + distill_loss (written-out gradient)": lambda s: distill_loss(s, teacher, targets, cfg)[0]}
print(f"cpu: {platform.processor() or platform.machine()}, flags: {sorted(cpu_flags())}, torch threads: {torch.get_num_threads()}")
for name, loss_of in forms.items():
    times = []
    for _ in range(5):
        start = time.perf_counter()
        loss_of(hidden @ head.T).backward()
        head.grad = None
        times.append(time.perf_counter() - start)
    print(f"{name}: {min(times[1:]):.3f} s (best of 4 after one)")
