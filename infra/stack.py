"""The team stack on loopback, started by the project's own files:

    PostgreSQL   backend store of the MLflow server (database `mlflow`) and of the Prefect server (`prefect`)
    S3 (moto)    MLflow's artifact destination (bucket lmforge-mlflow) and the DVC remote `team` (lmforge-dvc)
    MLflow       `mlflow server`, artifacts proxied to S3: clients need only its URL
    Prefect      `prefect server start`, a `process` work pool `local`, the infra/prefect.yaml deployment,
                 and a worker running flow runs in the project folder

    python -m infra up [--folder DIR]      start what is down (free 127.0.0.1 ports), deploy, write DIR/env
    python -m infra status                 each component up or down, with its port
    python -m infra down                   stop all of it (data stays in DIR/data)
    python -m infra remote [--root DIR]    point a checkout's DVC remote `team` at the stack (.dvc/config.local)
    python -m infra prereqs [--check]      install what the stack needs on this machine (infra/prereqs.py),
                                           or with --check only say what is missing

Everything lives under one folder (LMFORGE_STACK, default infra/.stack): data/, logs/<component>.log,
state.json (ports, pids) and env, the variables a client sources (`make run TEAM=1` does).
Credentials: infra/credentials.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from infra import credentials, prereqs

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COMPONENTS = ("postgres", "s3", "mlflow", "prefect", "worker")
MLFLOW_BUCKET, DVC_BUCKET = "lmforge-mlflow", "lmforge-dvc"
POOL = "local"  # the work pool named in infra/prefect.yaml
DEPLOYMENT = "lifecycle/nightly"  # flow/deployment, from infra/prefect.yaml
DB_ROLE = "lmforge"


@dataclass
class Stack:
    folder: Path
    root: Path = ROOT  # the project the worker runs flows in and whose .env holds the credentials
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def at(cls, folder: str | Path | None = None, root: Path = ROOT) -> "Stack":
        folder = Path(folder or os.environ.get("LMFORGE_STACK") or root / "infra" / ".stack").resolve()
        state = folder / "state.json"
        saved = json.loads(state.read_text()) if state.exists() else {}
        return cls(folder, Path(saved.get("root", root)), saved.get("ports", {}), saved.get("pids", {}))

    def save(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {"root": str(self.root), "ports": self.ports, "pids": self.pids}
        (self.folder / "state.json").write_text(json.dumps(state, indent=1))

    def log(self, name: str) -> Path:
        return self.folder / "logs" / f"{name}.log"

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def pgdata(self) -> Path:
        return self.folder / "data" / "postgres"

    def client_env(self, creds: dict[str, str]) -> dict[str, str]:
        """What a client of the stack needs: the server URLs and the S3 keys (for `dvc push` / `dvc pull`)."""
        return {
            "MLFLOW_TRACKING_URI": self.url("mlflow"),
            "PREFECT_API_URL": self.url("prefect") + "/api",
            "MLFLOW_S3_ENDPOINT_URL": self.url("s3"),
            "AWS_ACCESS_KEY_ID": creds["LMFORGE_S3_ACCESS_KEY"],
            "AWS_SECRET_ACCESS_KEY": creds["LMFORGE_S3_SECRET_KEY"],
            "AWS_DEFAULT_REGION": "us-east-1",
            "LMFORGE_STACK": str(self.folder),
        }


# -------------------------------------------------------------------------------------------- probes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except OSError:
        return False


def alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process (PostgreSQL run as its own user)
        return True
    return True


def healthy(stack: Stack, name: str) -> bool:
    """The component answers on its port (the worker: its process lives and the pool sees it online)."""
    if name not in stack.ports and name != "worker":
        return False
    if name == "postgres":
        bindir = prereqs.pg_bindir()
        return bool(bindir) and subprocess.run([str(bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p",
                                                str(stack.ports[name])]).returncode == 0
    if name == "s3":
        return http_ok(stack.url("s3") + "/moto-api/")
    if name == "mlflow":
        return http_ok(stack.url("mlflow") + "/health")
    if name == "prefect":
        return http_ok(stack.url("prefect") + "/api/health")
    return alive(stack.pids.get("worker")) and "prefect" in stack.ports and _pool_online(stack)


def _pool_online(stack: Stack) -> bool:
    req = urllib.request.Request(f"{stack.url('prefect')}/api/work_pools/{POOL}/workers/filter", data=b"{}",
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=2) as resp:
            return any(w.get("status") == "ONLINE" for w in json.loads(resp.read()))
    except OSError:
        return False


def wait_for(stack: Stack, name: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if healthy(stack, name):
            return
        pid = stack.pids.get(name)
        if pid and not alive(pid):
            break
        time.sleep(0.3)
    raise RuntimeError(f"{name} did not come up on port {stack.ports.get(name)}: see {stack.log(name)}")


# ----------------------------------------------------------------------------------------- processes
def spawn(stack: Stack, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> None:
    """Start a server in its own session (so `down` stops it with its children), output to its log."""
    stack.log(name).parent.mkdir(parents=True, exist_ok=True)
    with stack.log(name).open("ab") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, cwd=cwd or stack.folder, start_new_session=True)
    stack.pids[name] = proc.pid
    stack.save()


def stop(stack: Stack, name: str, grace: float = 10.0) -> None:
    pid = stack.pids.pop(name, None)
    if name == "postgres":
        bindir = prereqs.pg_bindir()
        if bindir and (stack.pgdata / "postmaster.pid").exists():
            subprocess.run(prereqs.as_db_user([str(bindir / "pg_ctl"), "-D", str(stack.pgdata), "-m", "fast", "-w",
                                               "stop"]), capture_output=True)
    elif alive(pid):
        os.killpg(pid, signal.SIGTERM)
        end = time.monotonic() + grace
        while alive(pid) and time.monotonic() < end:
            time.sleep(0.2)
            try:
                os.waitpid(pid, os.WNOHANG)  # reap it when we are its parent
            except ChildProcessError:
                pass
        if alive(pid):
            os.killpg(pid, signal.SIGKILL)
    stack.save()


# ------------------------------------------------------------------------------------------ components
def start_postgres(stack: Stack, creds: dict[str, str]) -> None:
    bindir = prereqs.postgres(install=True)
    stack.folder.mkdir(parents=True, exist_ok=True)
    if not prereqs.reachable_by_db_user(stack.folder):
        raise prereqs.Missing(f"{stack.folder} is not reachable by OS user {prereqs.PG_OS_USER!r}, which runs "
                              "PostgreSQL when we are root: use a stack folder on a world-traversable path "
                              "(LMFORGE_STACK=/var/tmp/lmforge-stack)")
    log = stack.log("postgres")
    log.parent.mkdir(parents=True, exist_ok=True)
    log.touch()
    if not (stack.pgdata / "PG_VERSION").exists():
        stack.pgdata.mkdir(parents=True, exist_ok=True)
        pwfile = stack.pgdata.parent / "initdb-pw"  # read by initdb, then deleted: never an argument
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(creds["LMFORGE_PG_PASSWORD"] + "\n")
        _give_to_db_user(stack.pgdata, log, pwfile)
        subprocess.run(prereqs.as_db_user([str(bindir / "initdb"), "-D", str(stack.pgdata), "-U", DB_ROLE,
                                           "--pwfile", str(pwfile), "--auth-host=scram-sha-256",
                                           "--auth-local=peer", "-E", "UTF8"]),
                       stdout=log.open("ab"), stderr=subprocess.STDOUT, check=True)
        pwfile.unlink()
    _give_to_db_user(stack.pgdata, log)
    stack.ports["postgres"] = free_port()
    options = f"-p {stack.ports['postgres']} -c listen_addresses=127.0.0.1 -k {stack.pgdata}"
    subprocess.run(prereqs.as_db_user([str(bindir / "pg_ctl"), "-D", str(stack.pgdata), "-l", str(log), "-w",
                                       "-t", "60", "-o", options, "start"]),
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_file = stack.pgdata / "postmaster.pid"
    stack.pids["postgres"] = int(pid_file.read_text().split()[0]) if pid_file.exists() else 0
    stack.save()
    wait_for(stack, "postgres", 30)
    _create_databases(stack, creds, ["mlflow", "prefect"])


def _give_to_db_user(*paths: Path) -> None:
    if os.geteuid() == 0:
        for path in paths:
            subprocess.run(["chown", "-R", f"{prereqs.PG_OS_USER}:", str(path)], check=True)
        os.chmod(paths[0], 0o700)


def _create_databases(stack: Stack, creds: dict[str, str], names: list[str]) -> None:
    import psycopg

    with psycopg.connect(host="127.0.0.1", port=stack.ports["postgres"], user=DB_ROLE, dbname="postgres",
                         password=creds["LMFORGE_PG_PASSWORD"], autocommit=True) as conn:
        have = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in names:
            if name not in have:
                conn.execute(f'CREATE DATABASE "{name}"')


def start_s3(stack: Stack, creds: dict[str, str]) -> None:
    exe = prereqs.moto_server(install=True)
    stack.ports["s3"] = free_port()
    spawn(stack, "s3", [str(exe), "-H", "127.0.0.1", "-p", str(stack.ports["s3"])], {})
    wait_for(stack, "s3", 60)
    for bucket in (MLFLOW_BUCKET, DVC_BUCKET):  # moto takes unsigned requests; a real endpoint has its buckets
        req = urllib.request.Request(f"{stack.url('s3')}/{bucket}", method="PUT")
        try:
            urllib.request.urlopen(req, timeout=10).close()
        except urllib.error.HTTPError as err:
            if err.code != 409:  # already there
                raise


def _db_env(creds: dict[str, str]) -> dict[str, str]:
    # libpq (psycopg) and asyncpg read PGPASSWORD: the password stays out of URLs, arguments and logs
    return {"PGPASSWORD": creds["LMFORGE_PG_PASSWORD"]}


def start_mlflow(stack: Stack, creds: dict[str, str]) -> None:
    store = f"postgresql+psycopg://{DB_ROLE}@127.0.0.1:{stack.ports['postgres']}/mlflow"
    # no job runner: it serves GenAI evaluation jobs lmforge does not use, and costs a process and seconds
    env = {**_db_env(creds), **stack.client_env(creds), "MLFLOW_DISABLE_TELEMETRY": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    spawn(stack, "mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(stack.ports["mlflow"]),
                            "--backend-store-uri", store, "--artifacts-destination", f"s3://{MLFLOW_BUCKET}/artifacts",
                            "--workers", "1"], env)


def start_prefect(stack: Stack, creds: dict[str, str]) -> None:
    env = {**_db_env(creds), **_prefect_env(stack),
           "PREFECT_API_DATABASE_CONNECTION_URL":
               f"postgresql+asyncpg://{DB_ROLE}@127.0.0.1:{stack.ports['postgres']}/prefect",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env["PREFECT_UI_API_URL"] = env.pop("PREFECT_API_URL")  # for the UI's own calls (else port 4200); not the server's
    spawn(stack, "prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                             "--port", str(stack.ports["prefect"])], env)


def _prefect_env(stack: Stack, home: str = "prefect") -> dict[str, str]:
    return {"PREFECT_HOME": str(stack.folder / "data" / home), "PREFECT_API_URL": stack.url("prefect") + "/api",
            "PREFECT_LOGGING_LEVEL": "INFO"}


def start_worker(stack: Stack, creds: dict[str, str]) -> None:
    """The process worker (it creates the pool when missing), then the deployments of infra/prefect.yaml.
    Flow runs inherit its environment: the stack's URLs and S3 keys, and LMFORGE_HOME, the project folder."""
    env = {**stack.client_env(creds), **_prefect_env(stack, "worker"), "LMFORGE_HOME": str(stack.root),
           "LMFORGE_TRACKING": "on", "PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
           "TOKENIZERS_PARALLELISM": "false", "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    spawn(stack, "worker", [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--type", "process"], env,
          cwd=stack.root)
    wait_for(stack, "worker", 90)
    deploy = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--prefect-file",
                             str(stack.root / "infra" / "prefect.yaml"), "--all"],
                            cwd=stack.root, env={**os.environ, **_prefect_env(stack, "worker")},
                            capture_output=True, text=True)
    stack.log("deploy").write_text(deploy.stdout + deploy.stderr)
    # prefect 3.8.8's `deploy` exits 1 after saving the deployment, on its own check for online workers (it
    # sends limit=null, which its server refuses with 422): the deployment on the server is what counts
    if not http_ok(f"{stack.url('prefect')}/api/deployments/name/{DEPLOYMENT}"):
        raise RuntimeError(f"prefect deploy failed: see {stack.log('deploy')}")


# ------------------------------------------------------------------------------------------- commands
def up(stack: Stack) -> Stack:
    """Start every component that is not healthy, in dependency order; write the client env file."""
    creds = credentials.credentials(stack.root)
    t0 = time.monotonic()
    for name in ("postgres", "s3"):
        if not healthy(stack, name):
            {"postgres": start_postgres, "s3": start_s3}[name](stack, creds)
    # the two servers start together: each spends seconds on its own schema migrations
    pending = [n for n in ("mlflow", "prefect") if not healthy(stack, n)]
    stack.ports.update({name: free_port() for name in pending})  # both known before either starts
    for name in pending:
        {"mlflow": start_mlflow, "prefect": start_prefect}[name](stack, creds)
    for name in pending:
        wait_for(stack, name, 180)
    if not healthy(stack, "worker"):
        stop(stack, "worker")
        start_worker(stack, creds)
    write_env(stack, creds)
    remote(stack, stack.root)
    stack.save()
    print(f"stack up in {time.monotonic() - t0:.1f} s; clients: set -a; . {stack.folder / 'env'}; set +a")
    return stack


def write_env(stack: Stack, creds: dict[str, str]) -> None:
    path = stack.folder / "env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("# written by `python -m infra up`: source it to use the team stack (holds S3 keys: keep it private)\n")
        fh.writelines(f"{k}={v}\n" for k, v in stack.client_env(creds).items())


def remote(stack: Stack, root: Path) -> None:
    """The DVC remote `team` of the checkout at `root`: bucket URL and endpoint in .dvc/config.local (git-ignored;
    keys come from the environment, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)."""
    from dvc.config import Config

    config = Config(str(root / ".dvc"), validate=False)
    with config.edit("local") as conf:
        conf["remote"]["team"] = {"url": f"s3://{DVC_BUCKET}/cache", "endpointurl": stack.url("s3")}


def down(stack: Stack) -> None:
    for name in reversed(COMPONENTS):
        stop(stack, name)
    stack.ports.clear()
    stack.save()


def status(stack: Stack) -> dict[str, bool]:
    return {name: healthy(stack, name) for name in COMPONENTS}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m infra", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["up", "down", "status", "remote", "prereqs"])
    ap.add_argument("--folder", help="the stack's folder (default: LMFORGE_STACK or infra/.stack)")
    ap.add_argument("--root", default=".", help="remote: the checkout whose DVC remote `team` to set")
    ap.add_argument("--check", action="store_true", help="prereqs: install nothing, only say what is missing")
    args = ap.parse_args(argv)
    stack = Stack.at(args.folder)
    try:
        if args.command == "prereqs":
            for name, where in prereqs.ensure(install=not args.check).items():
                print(f"{name:9} ok    {where}")
            return 0
        if args.command == "up":
            up(stack)
        elif args.command == "down":
            down(stack)
            print("stack down (data kept in", stack.folder / "data", ")")
        elif args.command == "remote":
            remote(stack, Path(args.root).resolve())
        states = status(stack)
        for name, ok in states.items():
            port = stack.ports.get(name, "-") if name != "worker" else f"pool {POOL}"
            print(f"{name:9} {'up' if ok else 'down':5} {port}")
        return 0 if args.command == "down" or all(states.values()) else 1
    except (prereqs.Missing, RuntimeError, subprocess.CalledProcessError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
