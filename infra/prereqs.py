"""What the stack needs on the machine, installed where it can be: PostgreSQL's server binaries (Debian's
`postgresql`, through apt when running as root), an OS user for it when running as root (PostgreSQL refuses
root), moto's own virtual environment (its botocore conflicts with dvc-s3's, so it cannot share .venv), and
Debian's `chromium`, the browser the UI test drives with Playwright (Playwright's own browser download needs a
CDN, not a package registry), and llama.cpp in its own virtual environment (llama-cpp-python compiled from its
source distribution: about two minutes, once per checkout), which the export test runs exported GGUF files in.

`python -m infra prereqs` installs them (`make test`, `make test-team` and `make infra-up` run it first);
`--check` only looks. What cannot be installed raises Missing: one line, what is missing and the command that
fixes it."""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

INFRA = Path(__file__).resolve().parent
S3_ENV = INFRA / ".venv-s3"
LLAMA_ENV = INFRA / ".venv-llama"  # llama.cpp (llama-cpp-python, compiled from source) for the export test
LLAMA_CPP = "llama-cpp-python==0.3.36"
# A portable build (AVX2, FMA, F16C), not one tuned to the building CPU: a native build on a Xeon with AMX runs AMX
# tile instructions that a virtual machine may not grant (SIGILL), and a venv may move to another CPU. Only the
# library the bindings load (libllama and ggml) is compiled: the package's own build adds llama.cpp's common
# library and the multimodal one, which the check never loads, and takes about three times as long.
LLAMA_CMAKE = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DBUILD_SHARED_LIBS=ON "
               "-DLLAMA_BUILD_COMMON=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF "
               "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release "
               "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON -DCMAKE_INSTALL_RPATH=$ORIGIN")
PG_OS_USER = os.environ.get("LMFORGE_PG_OS_USER", "postgres")  # who runs PostgreSQL when we are root


class Missing(RuntimeError):
    """A prerequisite is missing; the message is one line with the fix."""


def pg_bindir() -> Path | None:
    """The newest PostgreSQL server binaries: PATH first, then Debian's /usr/lib/postgresql/<v>/bin."""
    on_path = shutil.which("initdb")
    if on_path:
        return Path(on_path).resolve().parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _apt_install(package: str) -> bool:
    """apt-get install, quietly, as root only; False where that is not possible or fails."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return False
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL, "env": env}
    if subprocess.run(["apt-get", "install", "-y", "-qq", package], **quiet).returncode == 0:
        return True
    # a fresh machine has no package lists yet
    return (subprocess.run(["apt-get", "update", "-qq"], **quiet).returncode == 0
            and subprocess.run(["apt-get", "install", "-y", "-qq", package], **quiet).returncode == 0)


def postgres(install: bool) -> Path:
    """The server binaries' folder, installing Debian's package first when allowed and missing."""
    bindir = pg_bindir()
    if bindir is None and install and _apt_install("postgresql"):
        bindir = pg_bindir()
    if bindir is None:
        raise Missing("PostgreSQL server binaries (initdb, pg_ctl) not found: python -m infra prereqs as root "
                      "(apt-get install -y postgresql), or put a PostgreSQL bin folder on PATH")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(PG_OS_USER)
        except KeyError:
            if install and subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell",
                                           "/usr/sbin/nologin", PG_OS_USER], capture_output=True).returncode == 0:
                return bindir
            raise Missing(f"running as root, PostgreSQL needs an OS user to run as and {PG_OS_USER!r} does not exist: "
                          f"useradd --system {PG_OS_USER} (or set LMFORGE_PG_OS_USER)") from None
    return bindir


def as_db_user(cmd: list[str]) -> list[str]:
    """`cmd` run as the PostgreSQL OS user when we are root (PostgreSQL will not run as root)."""
    return ["runuser", "-u", PG_OS_USER, "--", *cmd] if os.geteuid() == 0 else cmd


def reachable_by_db_user(folder: Path) -> bool:
    return os.geteuid() != 0 or subprocess.run(as_db_user(["test", "-x", str(folder)])).returncode == 0


def moto_server(install: bool) -> Path:
    """moto's S3 server in its own venv (infra/.venv-s3), created from infra/constraints-s3.txt when allowed."""
    exe = S3_ENV / "bin" / "moto_server"
    if exe.exists() or not install:
        if not exe.exists():
            raise Missing(f"moto's S3 server is not installed: python -m infra prereqs creates {S3_ENV} (or: "
                          f"python3 -m venv {S3_ENV} && {S3_ENV}/bin/pip install -c infra/constraints-s3.txt 'moto[server]')")
        return exe
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(S3_ENV)], check=True)
    uv = Path(sys.executable).parent / "uv"
    pins = ["-c", str(INFRA / "constraints-s3.txt"), "moto[server]"]
    cmd = ([str(uv), "pip", "install", "-q", "--python", str(S3_ENV / "bin" / "python"), *pins] if uv.exists()
           else [str(S3_ENV / "bin" / "python"), "-m", "pip", "install", "-q", *pins])
    if subprocess.run(cmd).returncode != 0 or not exe.exists():
        raise Missing(f"could not install moto[server] into {S3_ENV} (needs the package registry): {' '.join(cmd)}")
    return exe


def chromium(install: bool) -> Path:
    """A Chromium binary for the browser test: LMFORGE_CHROMIUM, PATH, or Debian's package installed now."""
    def found() -> str | None:
        return os.environ.get("LMFORGE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")

    if found() is None and install:
        _apt_install("chromium")
    if (exe := found()) is None:
        raise Missing("Chromium not found (the UI test drives it): python -m infra prereqs as root "
                      "(apt-get install -y chromium), or set LMFORGE_CHROMIUM to a Chromium binary")
    return Path(exe)


def llama_cpp(install: bool) -> Path:
    """infra/.venv-llama with llama-cpp-python's bindings and llama.cpp's library compiled from the package's
    source distribution (needs cmake and a C++ compiler)."""
    python = LLAMA_ENV / "bin" / "python"
    probe = [str(python), "-c", "import llama_cpp"]
    stamp = LLAMA_ENV / "cmake-args"  # what the library was built with: other flags mean a rebuild
    built = stamp.read_text() if stamp.exists() else None
    if built == LLAMA_CMAKE and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    if not install:
        raise Missing(f"llama.cpp is not installed: python -m infra prereqs builds {LLAMA_ENV} ({LLAMA_CPP})")
    print(f"building llama.cpp ({LLAMA_CPP}) into {LLAMA_ENV}: about two minutes on 2 cores, once",
          file=sys.stderr, flush=True)
    fix = (f"could not build {LLAMA_CPP} into {LLAMA_ENV} (needs the package registry, cmake and g++): "
           f"python -m infra prereqs")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(LLAMA_ENV)], check=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--no-cache-dir"]
    work = LLAMA_ENV / "build"
    steps = [  # the bindings alone (LLAMA_BUILD=OFF compiles nothing), then the library from the same source
        (pip + [LLAMA_CPP], {"CMAKE_ARGS": "-DLLAMA_BUILD=OFF"}),
        ([str(python), "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", "-d", str(work), LLAMA_CPP], {}),
    ]
    for cmd, env in steps:
        if subprocess.run(cmd, env={**os.environ, **env}).returncode != 0:
            raise Missing(f"{fix} ({' '.join(cmd)} failed)")
    import tarfile

    (sdist,) = work.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    (source,) = work.glob("*/vendor/llama.cpp")
    jobs = str(os.cpu_count() or 2)
    for cmd in (["cmake", "-S", str(source), "-B", str(work / "cmake"), *LLAMA_CMAKE.split()],
                ["cmake", "--build", str(work / "cmake"), "--target", "llama", "-j", jobs]):
        if subprocess.run(cmd, stdout=subprocess.DEVNULL).returncode != 0:
            raise Missing(f"{fix} ({' '.join(cmd[:4])} ... failed)")
    (package,) = LLAMA_ENV.glob("lib/python*/site-packages/llama_cpp")
    (package / "lib").mkdir(exist_ok=True)
    for lib in (work / "cmake" / "bin").glob("lib*.so*"):  # they find each other beside them ($ORIGIN)
        shutil.copy2(lib, package / "lib" / lib.name, follow_symlinks=False)
    shutil.rmtree(work)
    if subprocess.run(probe, capture_output=True).returncode != 0:
        raise Missing(f"{fix} (import llama_cpp fails after the build)")
    stamp.write_text(LLAMA_CMAKE)
    return python


def ensure(install: bool = True) -> dict[str, str]:
    """Every prerequisite: {name: where it is}; raises Missing naming each one that is not there, one line."""
    found, missing = {}, []
    for name, check in (("postgres", postgres), ("s3", moto_server), ("chromium", chromium),
                        ("llama.cpp", llama_cpp)):
        try:
            found[name] = str(check(install))
        except Missing as err:
            missing.append(str(err))
    if missing:
        raise Missing("; ".join(missing))
    return found
