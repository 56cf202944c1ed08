"""Prefect flows: orchestration only; stages run through DVC."""

import os

# Before Prefect is imported: a cold ephemeral server (first run creates its database) can take longer
# than Prefect's 20 s default on a small machine; and there is no network for telemetry to reach.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
