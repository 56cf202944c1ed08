"""The stack's credentials: from the environment, else from the project's git-ignored `.env`, else made up
once and written there (mode 600). They never reach the command line, a log or MLflow: servers get them
through their environment (PGPASSWORD, AWS_*), and nothing here prints them."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

# variable -> what it is; a local S3 endpoint (moto) accepts any key pair, a real one needs the user's
NAMES = {
    "LMFORGE_PG_PASSWORD": "PostgreSQL password of the `lmforge` role",
    "LMFORGE_S3_ACCESS_KEY": "S3 access key id",
    "LMFORGE_S3_SECRET_KEY": "S3 secret access key",
}


def read_dotenv(path: Path) -> dict[str, str]:
    """KEY=VALUE lines (optional `export `, quotes stripped); comments and blank lines skipped."""
    if not path.exists():
        return {}
    found = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.removeprefix("export ").split("=", 1)
        found[key.strip()] = value.strip().strip("'\"")
    return found


def credentials(root: Path) -> dict[str, str]:
    """Every name in NAMES: environment first, then `<root>/.env`; missing ones are generated into `.env`."""
    dotenv = root / ".env"
    stored = read_dotenv(dotenv)
    found = {name: os.environ.get(name) or stored.get(name) for name in NAMES}
    missing = [name for name, value in found.items() if not value]
    if missing:
        fd = os.open(dotenv, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as fh:
            for name in missing:
                found[name] = secrets.token_urlsafe(24)
                fh.write(f"# {NAMES[name]} (made up by `python -m infra up`)\n{name}={found[name]}\n")
    return found  # type: ignore[return-value]
