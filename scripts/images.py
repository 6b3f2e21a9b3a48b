"""Build every Courier image with the real Dockerfiles on a real engine: `make images`.

    uv run --locked python scripts/images.py [--tag TAG] [--only NAME ...] [--no-install]

1. engine   a Docker client whose `docker build` has BuildKit, and a daemon answering it.
            A missing engine is installed (Debian/Ubuntu: apt-get install docker.io) and
            dockerd started as root in the background (log: /var/log/courier-dockerd.log).
            The `docker` first on PATH may have no buildx; Debian's /usr/bin/docker (20.10) has
            BuildKit built in: the first client that can build is used, and named.
2. bases    python:3.11-slim-bookworm and ghcr.io/astral-sh/uv:<version> (the FROM images):
            pulled when a registry answers; otherwise an image already in the daemon is reused,
            or a stand-in is made: debootstrap (minbase + python3, python3-venv,
            ca-certificates, from apt's Debian mirror) imported with `docker import`, and a
            FROM scratch image with the uv and uvx binaries of the PyPI `uv` wheel. Stand-ins
            carry the label io.courier.stand-in.
3. build    courier/user-service, courier/notification-service, courier/dlq-archiver
            (docker/service.Dockerfile, --build-arg PACKAGE=...) and courier/sinks
            (tools/sinks/Dockerfile), DOCKER_BUILDKIT=1, host network. The machine's CA bundle
            goes to uv as the build secret `ca-bundle` (uv trusts its own roots otherwise,
            which fails behind a TLS-inspecting proxy); it is never written to a layer.

Writes var/images/build.json (images, ids, sizes, build seconds, what each base was) and says
what it did at each step. Environment: COURIER_DOCKER (the client to use),
COURIER_DEBIAN_MIRROR (the debootstrap mirror), COURIER_CA_BUNDLE (the secret's file).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICE_DOCKERFILE = ROOT / "docker" / "service.Dockerfile"
SINKS_DOCKERFILE = ROOT / "tools" / "sinks" / "Dockerfile"
OUT_DIR = ROOT / "var" / "images"
DOCKERD_LOG = Path("/var/log/courier-dockerd.log")
STAND_IN_LABEL = "io.courier.stand-in"
DEBIAN_SUITE = "bookworm"
DEBOOTSTRAP_PACKAGES = "python3,python3-venv,ca-certificates"

#: Service → its HTTP port (the run contract; charts/courier uses the same numbers).
SERVICES = {"user-service": 8000, "notification-service": 8001, "dlq-archiver": 8002}


class ImagesError(Exception):
    """A step that cannot go on; the message says what to do."""


def say(message: str) -> None:
    print(f"images: {message}", flush=True)


def run(
    argv: Sequence[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        list(argv), env=env, timeout=timeout, capture_output=True, text=True, check=False
    )
    if check and result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise ImagesError(f"`{' '.join(argv)}` failed ({result.returncode}):\n{tail}")
    return result


# ---- 1. the engine ------------------------------------------------------------------------


def _client_candidates() -> list[str]:
    chosen = os.environ.get("COURIER_DOCKER")
    if chosen:
        return [chosen]
    found: list[str] = []
    for path in [shutil.which("docker"), "/usr/bin/docker"]:
        if path and Path(path).is_file() and os.access(path, os.X_OK):
            real = str(Path(path).resolve())
            if real not in {str(Path(p).resolve()) for p in found}:
                found.append(path)
    return found


def client_version(docker: str) -> tuple[int, ...]:
    out = run([docker, "version", "--format", "{{.Client.Version}}"], check=False, timeout=30)
    match = re.match(r"(\d+)\.(\d+)", out.stdout.strip())
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def can_build_with_buildkit(docker: str) -> bool:
    """BuildKit builds need buildx (Docker 23+) or a client with BuildKit built in (< 23)."""
    if run([docker, "buildx", "version"], check=False, timeout=30).returncode == 0:
        return True
    version = client_version(docker)
    return (0, 0) < version < (23, 0)


def daemon_answers(docker: str) -> bool:
    return (
        run(
            [docker, "version", "--format", "{{.Server.Version}}"], check=False, timeout=30
        ).returncode
        == 0
    )


def _is_root() -> bool:
    return os.geteuid() == 0


def install_engine() -> None:
    if not shutil.which("apt-get"):
        raise ImagesError(
            "no Docker engine here and this is not a Debian/Ubuntu machine: install Docker "
            "(an engine with BuildKit), start it, and re-run"
        )
    if not _is_root():
        raise ImagesError("installing docker.io with apt needs root: re-run as root")
    say("engine: not installed, installing docker.io with apt (apt-get install docker.io)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(["apt-get", "update", "-q"], env=env, timeout=600)
    run(
        ["apt-get", "install", "-y", "-q", "--no-install-recommends", "docker.io"],
        env=env,
        timeout=1200,
    )


def start_dockerd() -> None:
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not Path(dockerd).is_file():
        raise ImagesError("dockerd is not installed (apt-get install docker.io)")
    if not _is_root():
        raise ImagesError("the Docker daemon is not running and starting it needs root")
    # No default bridge: every Courier build and test run uses the host network.
    argv = [dockerd, "--bridge=none"]
    DOCKERD_LOG.parent.mkdir(parents=True, exist_ok=True)
    with DOCKERD_LOG.open("ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    say(
        f"engine: dockerd was not running, started `{' '.join(argv)}` as root in the background "
        f"(pid {proc.pid}, log {DOCKERD_LOG})"
    )


def find_client() -> str:
    """The docker client `make images` builds with, its daemon answering; nothing installed."""
    candidates = _client_candidates()
    builders = [c for c in candidates if can_build_with_buildkit(c)]
    if not builders:
        raise ImagesError(
            f"no docker client with BuildKit (tried {candidates or 'none'}): run `make images`"
        )
    if not daemon_answers(builders[0]):
        raise ImagesError(f"the Docker daemon does not answer {builders[0]}: run `make images`")
    return builders[0]


def _have_dockerd() -> bool:
    return bool(shutil.which("dockerd")) or Path("/usr/sbin/dockerd").is_file()


def ensure_engine(*, install: bool = True) -> str:
    """The docker client to build with, its daemon answering. Installs and starts as needed."""
    candidates = _client_candidates()
    builders = [c for c in candidates if can_build_with_buildkit(c)]
    if not builders or not _have_dockerd():
        if not install:
            raise ImagesError(
                f"no Docker engine with BuildKit here (clients tried: {candidates or 'none'}); "
                "run without --no-install to install docker.io"
            )
        install_engine()
        candidates = _client_candidates()
        builders = [c for c in candidates if can_build_with_buildkit(c)]
        if not builders:
            raise ImagesError("no docker client with BuildKit, even after installing docker.io")
    docker = builders[0]
    skipped = [c for c in candidates if c not in builders]
    why = f"; {', '.join(skipped)} has no buildx" if skipped else ""
    version = ".".join(map(str, client_version(docker)))
    say(f"engine: building with the client {docker} ({version}, DOCKER_BUILDKIT=1{why})")
    if not daemon_answers(docker):
        if not install:
            raise ImagesError("the Docker daemon does not answer (and --no-install was given)")
        start_dockerd()
        deadline = time.monotonic() + 60
        while not daemon_answers(docker):
            if time.monotonic() > deadline:
                tail = DOCKERD_LOG.read_text(errors="replace").splitlines()[-10:]
                raise ImagesError("dockerd did not answer within 60 s:\n" + "\n".join(tail))
            time.sleep(0.5)
        how = "started"
    else:
        how = "already running"
    server = run([docker, "version", "--format", "{{.Server.Version}}"]).stdout.strip()
    say(f"engine: daemon {server} answers ({how})")
    return docker


# ---- 2. the base images -------------------------------------------------------------------


def dockerfile_arg(dockerfile: Path, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)\s*$", dockerfile.read_text(), re.MULTILINE)
    if not match:
        raise ImagesError(f"{dockerfile}: no `ARG {name}=...` default")
    return match.group(1)


def image_id(docker: str, ref: str) -> str | None:
    out = run([docker, "image", "inspect", "--format", "{{.Id}}", ref], check=False)
    return out.stdout.strip() if out.returncode == 0 else None


def is_stand_in(docker: str, ref: str) -> bool:
    out = run(
        [
            docker,
            "image",
            "inspect",
            "--format",
            f'{{{{index .Config.Labels "{STAND_IN_LABEL}"}}}}',
            ref,
        ],
        check=False,
    )
    return out.returncode == 0 and out.stdout.strip() not in {"", "<no value>"}


def try_pull(docker: str, ref: str) -> tuple[bool, str]:
    try:
        out = run([docker, "pull", ref], check=False, timeout=600)
    except subprocess.TimeoutExpired:
        return False, "timed out after 600 s"
    if out.returncode == 0:
        return True, ""
    lines = (out.stderr or out.stdout).strip().splitlines()
    return False, lines[-1] if lines else f"exit {out.returncode}"


def debian_mirror() -> str:
    """The Debian mirror apt uses (one-line or deb822 sources), or COURIER_DEBIAN_MIRROR."""
    if os.environ.get("COURIER_DEBIAN_MIRROR"):
        return os.environ["COURIER_DEBIAN_MIRROR"]
    files = [Path("/etc/apt/sources.list")]
    directory = Path("/etc/apt/sources.list.d")
    if directory.is_dir():
        files += sorted(directory.glob("*.list")) + sorted(directory.glob("*.sources"))
    for path in files:
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        # one-line: deb [opts] URI SUITE COMPONENTS
        for line in text.splitlines():
            words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
            if len(words) >= 3 and words[0] == "deb" and _is_debian_main(words[1], words[2]):
                return words[1]
        # deb822 stanzas (Types:, URIs:, Suites: ...)
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            for line in stanza.splitlines():
                key, sep, value = line.partition(":")
                if sep and not line.startswith(("#", " ", "\t")):
                    fields[key.strip().lower()] = value.strip()
            if "deb" not in fields.get("types", "").split():
                continue
            for uri in fields.get("uris", "").split():
                if any(_is_debian_main(uri, s) for s in fields.get("suites", "").split()):
                    return uri
    raise ImagesError(
        f"no Debian mirror serving {DEBIAN_SUITE} in the apt sources: set COURIER_DEBIAN_MIRROR "
        "(for example the mirror your Debian machines use) and re-run"
    )


def _is_debian_main(uri: str, suite: str) -> bool:
    return suite == DEBIAN_SUITE and uri.rstrip("/").endswith("/debian")


def make_python_stand_in(docker: str, ref: str) -> None:
    if not shutil.which("debootstrap"):
        if not (shutil.which("apt-get") and _is_root()):
            raise ImagesError("debootstrap is needed for the Python stand-in: install it")
        say("bases: installing debootstrap with apt")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        run(
            ["apt-get", "install", "-y", "-q", "--no-install-recommends", "debootstrap"],
            env=env,
            timeout=600,
        )
    mirror = debian_mirror()
    say(
        f"bases: making a stand-in for {ref}: debootstrap --variant=minbase "
        f"--include={DEBOOTSTRAP_PACKAGES} {DEBIAN_SUITE} from {mirror}"
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="courier-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        run(
            [
                "debootstrap",
                "--variant=minbase",
                f"--include={DEBOOTSTRAP_PACKAGES}",
                DEBIAN_SUITE,
                str(rootfs),
                mirror,
            ],
            timeout=1800,
        )
        # What the slim image leaves out too: package caches and lists.
        for leftover in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for path in (rootfs / leftover).glob("*"):
                if path.is_file():
                    path.unlink()
        local_bin = rootfs / "usr" / "local" / "bin"
        local_bin.mkdir(parents=True, exist_ok=True)
        for name in ("python", "python3"):
            link = local_bin / name
            if not link.exists():
                link.symlink_to("/usr/bin/python3")
        version = run(["chroot", str(rootfs), "/usr/local/bin/python", "--version"]).stdout
        if not version.startswith("Python 3.11."):
            raise ImagesError(f"the {DEBIAN_SUITE} stand-in has {version.strip()}, not 3.11")
        changes = [
            "ENV PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin",
            "ENV LANG=C.UTF-8",
            'CMD ["python3"]',
            f'LABEL {STAND_IN_LABEL}="debootstrap {DEBIAN_SUITE} minbase + {DEBOOTSTRAP_PACKAGES}"',
        ]
        argv = [docker, "import"]
        for change in changes:
            argv += ["--change", change]
        argv += ["-", ref]
        with subprocess.Popen(
            ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
        ) as tar_proc:
            imported = subprocess.run(argv, stdin=tar_proc.stdout, capture_output=True, check=False)
        if tar_proc.returncode != 0 or imported.returncode != 0:
            raise ImagesError(f"docker import failed: {imported.stderr.decode(errors='replace')}")
    say(f"bases: made {ref} (stand-in, {version.strip()}) in {time.monotonic() - started:.0f} s")


def make_uv_stand_in(docker: str, ref: str) -> None:
    version = ref.rsplit(":", 1)[1]
    uv = shutil.which("uv") or os.environ.get("UV")
    if not uv:
        raise ImagesError("uv is needed to fetch the uv wheel (make setup installs it)")
    say(f"bases: making a stand-in for {ref}: FROM scratch, uv and uvx of the wheel uv=={version}")
    with tempfile.TemporaryDirectory(prefix="courier-uv-") as tmp:
        target = Path(tmp) / "wheel"
        # The static (musl) build, as in the real image: it runs in any base.
        run(
            [
                uv,
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--python-platform",
                f"{os.uname().machine}-unknown-linux-musl",
                "--target",
                str(target),
                f"uv=={version}",
            ],
            timeout=600,
        )
        context = Path(tmp) / "context"
        context.mkdir()
        for name in ("uv", "uvx"):
            shutil.copy2(target / "bin" / name, context / name)
        (context / "Dockerfile").write_text(
            "FROM scratch\n"
            f'LABEL {STAND_IN_LABEL}="uv and uvx from the PyPI wheel uv=={version}"\n'
            "COPY uv uvx /\n"
            'ENTRYPOINT ["/uv"]\n'
        )
        run([docker, "build", "-q", "-t", ref, str(context)], env=_build_env(), timeout=600)
    say(f"bases: made {ref} (stand-in)")


def ensure_base(docker: str, ref: str, *, kind: str) -> str:
    """Pull ``ref``; else reuse what the daemon has; else make a stand-in. Says which."""
    pulled, why = try_pull(docker, ref)
    if pulled:
        say(f"bases: pulled {ref} from its registry")
        return "pulled"
    if image_id(docker, ref):
        what = "stand-in" if is_stand_in(docker, ref) else "image"
        say(f"bases: no registry answers ({why}); reused the {what} {ref} already in the daemon")
        return f"reused {what}"
    say(f"bases: no registry answers ({why})")
    if kind == "python":
        make_python_stand_in(docker, ref)
    else:
        make_uv_stand_in(docker, ref)
    return "made stand-in"


# ---- 3. the images ------------------------------------------------------------------------


@dataclass
class Built:
    image: str
    dockerfile: str
    build_args: dict[str, str]
    id: str = ""
    size_bytes: int = 0
    seconds: float = 0.0


@dataclass
class Report:
    client: str
    bases: dict[str, str] = field(default_factory=dict)
    ca_bundle: str | None = None
    images: list[Built] = field(default_factory=list)
    seconds: float = 0.0


def _build_env() -> dict[str, str]:
    return {**os.environ, "DOCKER_BUILDKIT": "1"}


def ca_bundle() -> Path | None:
    for candidate in (
        os.environ.get("COURIER_CA_BUNDLE"),
        os.environ.get("SSL_CERT_FILE"),
        "/etc/ssl/certs/ca-certificates.crt",
    ):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def planned(tag: str) -> list[Built]:
    images = [
        Built(
            image=f"courier/{name}:{tag}",
            dockerfile=str(SERVICE_DOCKERFILE.relative_to(ROOT)),
            build_args={"PACKAGE": name, "HTTP_PORT": str(port)},
        )
        for name, port in SERVICES.items()
    ]
    images.append(
        Built(
            image=f"courier/sinks:{tag}",
            dockerfile=str(SINKS_DOCKERFILE.relative_to(ROOT)),
            build_args={},
        )
    )
    return images


def build(docker: str, image: Built, bundle: Path | None) -> None:
    argv = [docker, "build", "--network", "host", "-f", image.dockerfile, "-t", image.image]
    for key, value in image.build_args.items():
        argv += ["--build-arg", f"{key}={value}"]
    if bundle is not None:
        argv += ["--secret", f"id=ca-bundle,src={bundle}"]
    argv.append(".")
    started = time.monotonic()
    log = OUT_DIR / f"build-{image.image.split('/')[-1].split(':')[0]}.log"
    with log.open("w") as out:
        result = subprocess.run(
            argv, cwd=ROOT, env=_build_env(), stdout=out, stderr=subprocess.STDOUT, check=False
        )
    image.seconds = round(time.monotonic() - started, 1)
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise ImagesError(f"building {image.image} failed (full log {log}):\n{tail}")
    image.id = image_id(docker, image.image) or ""
    size = run([docker, "image", "inspect", "--format", "{{.Size}}", image.image]).stdout
    image.size_bytes = int(size.strip())
    say(
        f"built {image.image} in {image.seconds:.1f} s: {image.size_bytes / 1e6:.1f} MB "
        f"({image.id[:19]})"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default=os.environ.get("COURIER_IMAGE_TAG", "dev"))
    parser.add_argument(
        "--only", nargs="+", metavar="NAME", help="build only these (user-service, sinks, ...)"
    )
    parser.add_argument(
        "--no-install", action="store_true", help="never install or start the engine"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    try:
        docker = ensure_engine(install=not args.no_install)
        report = Report(client=docker)
        python_ref = dockerfile_arg(SERVICE_DOCKERFILE, "PYTHON_IMAGE")
        uv_ref = dockerfile_arg(SERVICE_DOCKERFILE, "UV_IMAGE")
        for dockerfile in (SINKS_DOCKERFILE,):
            for name, ref in (("PYTHON_IMAGE", python_ref), ("UV_IMAGE", uv_ref)):
                if dockerfile_arg(dockerfile, name) != ref:
                    raise ImagesError(f"{dockerfile}: {name} differs from {SERVICE_DOCKERFILE}")
        report.bases[python_ref] = ensure_base(docker, python_ref, kind="python")
        report.bases[uv_ref] = ensure_base(docker, uv_ref, kind="uv")
        bundle = ca_bundle()
        report.ca_bundle = str(bundle) if bundle else None
        if bundle:
            say(f"build: uv trusts {bundle} (build secret ca-bundle, not in any layer)")
        OUT_DIR.mkdir(parents=True, exist_ok=True)
        images = planned(args.tag)
        if args.only:
            wanted = set(args.only)
            unknown = wanted - {i.image.split("/")[1].split(":")[0] for i in images}
            if unknown:
                raise ImagesError(f"--only: no image named {sorted(unknown)}")
            images = [i for i in images if i.image.split("/")[1].split(":")[0] in wanted]
        for image in images:
            build(docker, image, bundle)
            report.images.append(image)
    except ImagesError as error:
        print(f"images: error: {error}", file=sys.stderr)
        return 1
    report.seconds = round(time.monotonic() - started, 1)
    (OUT_DIR / "build.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    say(f"done in {report.seconds:.0f} s; {OUT_DIR.relative_to(ROOT)}/build.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
