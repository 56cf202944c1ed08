"""Which process owns an MLflow run: tags naming it (host, pid, start time), and whether it has surely ended, so
that a run a killed process left RUNNING can be marked FAILED by whoever comes next."""

import os
import socket
from typing import Mapping

import psutil

HOST_TAG, PID_TAG, PID_START_TAG = "lmforge.host", "lmforge.pid", "lmforge.pid_start"  # who ends the run


def started(process: psutil.Process) -> str:  # with the pid, it names one process even once the pid is reused
    return f"{process.create_time():.2f}"


def owner_tags() -> dict[str, str]:
    """Tags naming this process as the one that ends the run it creates."""
    return {HOST_TAG: socket.gethostname(), PID_TAG: str(os.getpid()), PID_START_TAG: started(psutil.Process())}


def owner_gone(tags: Mapping[str, str]) -> bool:
    """Whether the run's owner (its tags) has surely ended: this host, its pid free, a zombie or another process."""
    pid = tags.get(PID_TAG, "")
    if tags.get(HOST_TAG) != socket.gethostname() or not pid.isdigit():
        return False
    try:
        process = psutil.Process(int(pid))
        reused = bool(tags.get(PID_START_TAG)) and started(process) != tags[PID_START_TAG]
        return reused or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:  # exists, another user's: take it for the owner
        return False
