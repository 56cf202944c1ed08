"""Masking secrets in what lmforge writes (MLflow params and tags, meta files, summaries) and flattening nested
configs into MLflow's dotted keys."""

import os
import re
from typing import Any, Mapping

# HF_TOKEN, GITHUB_TOKEN, AWS_SECRET_ACCESS_KEY, PGPASSWORD, OPENAI_API_KEY...; not TOKENIZERS_PARALLELISM
SECRET_NAME = re.compile(r"(?<![A-Z])TOKEN(?![A-Z])|SECRET|PASSW|API_?KEY|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@:]*:[^\s/@]*@")


def _secrets() -> list[str]:
    """Values of secret-named variables and URI passwords in the environment, but short ones (a flag "1")."""
    found = {v for k, v in os.environ.items() if SECRET_NAME.search(k)}
    for value in os.environ.values():
        found |= {m.group(0).split("://", 1)[1].rsplit("@", 1)[0].split(":", 1)[1] for m in USERINFO.finditer(value)}
    return sorted((v for v in found if len(v) >= 6), key=len, reverse=True)


def redact(value: Any) -> Any:
    """`value` (strings, mappings and lists of them) with URI passwords and secret values masked as ***."""
    if isinstance(value, str):
        text = USERINFO.sub(r"\g<scheme>***@", value)
        for secret in _secrets():
            text = text.replace(secret, "***")
        return text
    if isinstance(value, Mapping):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> dotted keys, lists of mappings indexed (sources.0.name)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif isinstance(value, list) and value and isinstance(value[0], Mapping):
            for i, item in enumerate(value):
                out.update(flatten(item, f"{name}.{i}."))
        else:
            out[name] = value
    return out
