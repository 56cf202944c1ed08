"""Prefect flows: orchestration only; stages run through DVC."""

import os

# Before Prefect is imported: a cold ephemeral server (first run creates its database) can take longer
# than Prefect's 20 s default on a small machine; and there is no network for telemetry to reach.
PREFECT_DEFAULTS = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
for _key, _value in PREFECT_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
