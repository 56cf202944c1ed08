"""lmforge's library: what the stages under tasks/ share (config, stage runner, tracking, data, models,
training helpers, low-bit, distributed). No module here imports a stage."""

from lmforge.lowbit import quiet as _quiet_bitsandbytes

_quiet_bitsandbytes()  # before PEFT/TRL import bitsandbytes: its import-time kernel warning is ours to phrase
