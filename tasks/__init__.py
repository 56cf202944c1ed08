"""lmforge stages: plain functions behind `python -m tasks.<stage>`."""

from tasks.lowbit import quiet as _quiet_bitsandbytes

_quiet_bitsandbytes()  # before PEFT/TRL import bitsandbytes: its import-time kernel warning is ours to phrase
