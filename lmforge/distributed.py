"""Several processes for one stage: the launch, and what a worker needs (rank, collectives, wrapping).

A training stage's command (`python -m tasks.<stage>`, what dvc.yaml calls) reads the `launch` section of
params.yaml. With more than one process it starts them with torchrun (`torch.distributed.run`: its elastic
agent handles the rendezvous, tears the group down when a worker dies, and restarts it up to
`launch.max_restarts` times) running the same command, and waits. In the workers:
- pretrain (a hand-written loop) wraps its model in DDP or FSDP here and shards each global batch;
- sft, lora, reward and ppo run TRL trainers, which sit on Accelerate: Accelerate reads torchrun's
  environment, sets up the process group and wraps the model (DDP, or FSDP from `trainer_args`).
Only rank 0 publishes outputs and talks to the tracker (tasks/stage.py); the other ranks write into a
scratch folder that is thrown away. Each stage keeps one process's global batch: the per-process batch is
the configured one divided by the number of processes.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from lmforge.errors import InputError

NODE_RANK_ENV = "LMFORGE_NODE_RANK"  # this machine's rank among launch.nnodes (differs per machine)
STATUS_ENV = "LMFORGE_WORKER_STATUS"  # file where rank 0 leaves its exit code (2 = bad input)
BACKEND_ENV = "LMFORGE_DIST_BACKEND"
STRATEGY_ENV = "LMFORGE_DIST_STRATEGY"


# ------------------------------------------------------------------------------------- where am I
def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def is_worker() -> bool:
    """Started by the launcher (torchrun sets WORLD_SIZE and friends in every worker)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or world_size() > 1


def strategy() -> str:
    return os.environ.get(STRATEGY_ENV, "ddp")


# ----------------------------------------------------------------------------------------- launch
def processes(launch) -> int:
    return launch.nproc_per_node * launch.nnodes


def plan(stage: str, cfg, launch) -> bool:
    """Whether this stage's command starts workers; checks the per-process batch split first (bad input)."""
    if launch is None or stage not in launch.stages or processes(launch) == 1:
        return False
    per_process(getattr(cfg, "batch_size", processes(launch)), f"{stage}.batch_size", processes(launch))
    mini = getattr(cfg, "mini_batches", None)
    if mini and (cfg.batch_size // processes(launch)) % mini:
        raise InputError(f"{stage}.batch_size / processes ({cfg.batch_size // processes(launch)}) must be a "
                         f"multiple of {stage}.mini_batches ({mini})")
    return True


def per_process(total: int, what: str, n: int | None = None) -> int:
    """`total` split evenly over the processes, or InputError naming the knob."""
    n = world_size() if n is None else n
    if total % n:
        raise InputError(f"{what} ({total}) must be a multiple of the number of processes ({n}): the global batch "
                         "is kept, each process takes an equal share")
    return total // n


def torchrun_command(stage: str, argv: list[str], launch) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={launch.nproc_per_node}",
           f"--max-restarts={launch.max_restarts}"]
    if launch.nnodes == 1:
        cmd.append("--standalone")  # a free local port: two stages or projects on one machine do not collide
    else:
        cmd += [f"--nnodes={launch.nnodes}", f"--node-rank={os.environ.get(NODE_RANK_ENV, '0')}",
                "--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}"]
    return cmd + ["-m", f"tasks.{stage}", *argv]


def launch(stage: str, argv: list[str], launch_cfg, out: Path) -> int:
    """Run the stage's command on launch_cfg's processes and wait; returns the stage's exit code.

    A worker that fails or is killed fails the stage: torchrun stops the others, nothing is published (rank 0
    publishes only after its work is done) and the staging folder is removed, so a retry starts clean."""
    threads = max(1, (os.cpu_count() or 1) // launch_cfg.nproc_per_node)
    with tempfile.TemporaryDirectory(prefix="lmforge-launch-") as tmp:
        status = Path(tmp) / "status"
        env = {**os.environ, STATUS_ENV: str(status), BACKEND_ENV: launch_cfg.backend, STRATEGY_ENV: launch_cfg.strategy}
        env.setdefault("OMP_NUM_THREADS", str(threads))  # torchrun would force 1 and warn
        n = processes(launch_cfg)
        print(f"{stage}: starting {n} processes ({launch_cfg.nnodes} node(s) x {launch_cfg.nproc_per_node}, "
              f"{launch_cfg.strategy}) with torchrun", file=sys.stderr)
        code = subprocess.run(torchrun_command(stage, argv, launch_cfg), env=env).returncode
        reported = status.read_text().strip() if status.exists() else ""
    if code != 0:
        shutil.rmtree(Path(out).parent / f".{Path(out).name}.staging", ignore_errors=True)
        if reported == "2":
            return 2  # bad input: rank 0 printed the one-line error
        print(f"error: {stage}: a worker failed (torchrun exit code {code}); nothing was published", file=sys.stderr)
        return code if code > 0 else 1
    return 0


def report_status(code: int) -> None:
    """Rank 0 leaves its exit code for the launcher (torchrun itself only says that a worker failed)."""
    path = os.environ.get(STATUS_ENV)
    if path and is_main():
        Path(path).write_text(str(code))


# --------------------------------------------------------------------------------- in the workers
def init(device) -> None:
    """Join the process group (no-op with one process). Backend: launch.backend, auto = nccl on CUDA."""
    if not is_worker():
        return
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return
    backend = os.environ.get(BACKEND_ENV, "auto")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend)


def barrier() -> None:
    """Wait for every process (no-op with one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def close() -> None:
    import torch.distributed as dist

    barrier()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def mean(value: float) -> float:
    """The mean of a number over all processes (the number itself with one process)."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return float(value)
    backend = dist.get_backend()
    t = torch.tensor([float(value)], dtype=torch.float64, device="cuda" if backend == "nccl" else "cpu")
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def wrap(model, device):
    """DDP or FSDP (FSDP2: each decoder layer, then the whole model) over the process group; unchanged alone."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return model
    if strategy() == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(getattr(model, "model", model), "layers", []):
            fully_shard(layer)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def no_sync(model, last: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulated step."""
    from contextlib import nullcontext

    if last:
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
            model.set_requires_gradient_sync(True)
        return nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
    return nullcontext()


def unwrap(model):
    """The module a user would save (DDP's .module; FSDP shards in place, see full_state)."""
    return getattr(model, "module", model)


def full_state(model, optimizer=None) -> tuple[dict, dict | None]:
    """Full (unsharded) model and optimizer state dicts on the CPU; a collective under FSDP (every rank calls)."""
    if strategy() == "fsdp" and is_worker():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        if optimizer is None:
            from torch.distributed.checkpoint.state_dict import get_model_state_dict

            return get_model_state_dict(model, options=opts), None
        return get_state_dict(model, optimizer, options=opts)
    module = unwrap(model)
    return module.state_dict(), (optimizer.state_dict() if optimizer is not None else None)


def load_full_state(model, optimizer, model_state: dict, optim_state: dict) -> None:
    """Inverse of full_state: full state dicts into a (possibly sharded) model and its optimizer."""
    if strategy() == "fsdp" and is_worker():
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                       options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return
    unwrap(model).load_state_dict(model_state)
    optimizer.load_state_dict(optim_state)


def trainer_args() -> dict:
    """Extra TrainingArguments for TRL/transformers trainers under torchrun (Accelerate does the rest)."""
    if not is_worker():
        return {}
    args = {"ddp_backend": None if os.environ.get(BACKEND_ENV, "auto") == "auto" else os.environ[BACKEND_ENV]}
    if strategy() == "fsdp":
        args.update(fsdp="full_shard auto_wrap", fsdp_config={"transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"]})
    return args
