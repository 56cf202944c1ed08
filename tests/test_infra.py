"""The team stack's tooling without starting it: credentials, status of a stack that is down, the DVC remote,
one-line errors. (tests/test_team.py starts it for real.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from infra import credentials, prereqs
from infra.stack import COMPONENTS, Stack, remote, status

ROOT = Path(__file__).resolve().parents[1]


def test_credentials_come_from_the_environment_then_dotenv_and_missing_ones_are_made_up(tmp_path, monkeypatch):
    for name in credentials.NAMES:
        monkeypatch.delenv(name, raising=False)
    (tmp_path / ".env").write_text("# mine\nexport LMFORGE_PG_PASSWORD='from-dotenv'\n")
    monkeypatch.setenv("LMFORGE_S3_ACCESS_KEY", "from-env")
    found = credentials.credentials(tmp_path)
    assert found["LMFORGE_PG_PASSWORD"] == "from-dotenv" and found["LMFORGE_S3_ACCESS_KEY"] == "from-env"
    made = found["LMFORGE_S3_SECRET_KEY"]
    assert len(made) >= 24
    assert credentials.credentials(tmp_path)["LMFORGE_S3_SECRET_KEY"] == made  # kept in .env, not remade
    text = (tmp_path / ".env").read_text()
    assert "from-env" not in text and text.count("LMFORGE_S3_SECRET_KEY=") == 1


def test_status_of_a_stack_that_never_started_is_down_for_each_component(tmp_path, capsys):
    stack = Stack.at(tmp_path / "stack")
    assert status(stack) == {name: False for name in COMPONENTS}
    out = subprocess.run([sys.executable, "-m", "infra", "status", "--folder", str(tmp_path / "stack")], cwd=ROOT,
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert [line.split()[:2] for line in out.stdout.splitlines()] == [[n, "down"] for n in COMPONENTS]


def test_remote_points_dvc_at_the_stack_in_the_local_config_only(tmp_path):
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=tmp_path, check=True)
    stack = Stack(tmp_path / "stack", ports={"s3": 45678})
    remote(stack, tmp_path)
    local = (tmp_path / ".dvc" / "config.local").read_text()
    assert "s3://lmforge-dvc/cache" in local and "http://127.0.0.1:45678" in local
    assert "team" not in (tmp_path / ".dvc" / "config").read_text()
    ignored = subprocess.run(["git", "check-ignore", ".dvc/config.local"], cwd=tmp_path, capture_output=True)
    assert ignored.returncode == 0  # DVC git-ignores it: endpoints and local settings stay out of the repo


def test_a_missing_prerequisite_is_one_line_with_its_fix(monkeypatch):
    monkeypatch.setattr(prereqs, "pg_bindir", lambda: None)
    monkeypatch.setattr(prereqs, "_apt_install", lambda package: False)
    try:
        prereqs.postgres(install=True)
    except prereqs.Missing as err:
        message = str(err)
    assert "\n" not in message and "apt-get install -y postgresql" in message


def test_secrets_and_stack_state_are_git_ignored():
    ignored = subprocess.run(["git", "check-ignore", ".env", "infra/.stack/env", "infra/.venv-s3/bin/python"],
                             cwd=ROOT, capture_output=True, text=True)
    assert ignored.stdout.split() == [".env", "infra/.stack/env", "infra/.venv-s3/bin/python"]


def test_prereqs_check_installs_nothing_and_names_each_fix_in_one_line(tmp_path, monkeypatch, capsys):
    from infra.stack import main

    monkeypatch.setattr(prereqs, "pg_bindir", lambda: None)
    monkeypatch.setattr(prereqs, "S3_ENV", tmp_path / "venv-s3")
    monkeypatch.setattr(prereqs, "_apt_install", lambda package: pytest.fail("--check must not install"))
    assert main(["prereqs", "--check"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "PostgreSQL server binaries" in err and "moto's S3 server" in err
    assert err.count("python -m infra prereqs") == 2 and not (tmp_path / "venv-s3").exists()


def test_prereqs_reports_where_each_one_is(monkeypatch, capsys):
    from infra.stack import main

    monkeypatch.setattr(prereqs, "postgres", lambda install: Path("/opt/pg/bin"))
    monkeypatch.setattr(prereqs, "moto_server", lambda install: Path("/opt/moto/bin/moto_server"))
    assert main(["prereqs"]) == 0
    assert capsys.readouterr().out.split("\n")[:2] == ["postgres  ok    /opt/pg/bin", "s3        ok    /opt/moto/bin/moto_server"]
