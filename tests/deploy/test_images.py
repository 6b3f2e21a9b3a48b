"""The Dockerfiles and .dockerignore: what they promise, read without an engine.

These run in `make test`. `make test-images` (tests/images) builds the images with the real
Dockerfiles on a real engine and runs them; this file holds what can be read off the files:
the blockers that once stopped every build (a `# syntax=` line, wildcard re-includes under an
excluded parent, a CA bundle that could reach a layer) stay fixed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

import pytest

from scripts.images import SERVICES as BUILT_SERVICES
from tests.support.images import (
    REPO_ROOT,
    SERVICE_DOCKERFILE,
    SINKS_DOCKERFILE,
    UV_IMAGE,
    Dockerfile,
    DockerIgnore,
    default_http_port,
    parse_copy,
    parse_dockerfile,
    parse_run,
    read_pyproject,
    workspace_closure,
    workspace_members,
)

SERVICES = sorted(p.parent.name for p in (REPO_ROOT / "services").glob("*/pyproject.toml"))
DOCKERFILES = [SERVICE_DOCKERFILE, SINKS_DOCKERFILE]
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|PRIVATE_KEY|API_KEY|CREDENTIAL", re.I)


def package_of(service: str) -> str:
    return service.replace("-", "_")


def service_port(service: str) -> int:
    return default_http_port(
        REPO_ROOT / "services" / service / "src" / package_of(service) / "config.py"
    )


def dockerfile(service: str) -> Dockerfile:
    """docker/service.Dockerfile as `make images` builds it for ``service``."""
    return parse_dockerfile(
        SERVICE_DOCKERFILE,
        {"PACKAGE": service, "HTTP_PORT": str(BUILT_SERVICES[service])},
    )


def uv_syncs(df: Dockerfile) -> list[tuple[int, str, list[str]]]:
    """(position in the builder stage, the RUN's text, its flags) of every ``uv sync``."""
    builder = df.stage("builder")
    return [
        (n, i.value, parse_run(i.value).flags)
        for n, i in enumerate(builder.instructions)
        if i.name == "RUN" and "uv sync" in i.value
    ]


def test_one_dockerfile_serves_every_service() -> None:
    assert SERVICES == ["dlq-archiver", "notification-service", "user-service"]
    assert sorted(BUILT_SERVICES) == SERVICES, "scripts/images.py builds every service"
    assert not list((REPO_ROOT / "services").glob("*/Dockerfile")), "no per-service copies"
    for service, port in BUILT_SERVICES.items():
        assert port == service_port(service), service


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_no_syntax_line_the_builtin_frontend_builds_it(path: Path) -> None:
    # `# syntax=` makes BuildKit fetch its frontend from a registry before anything builds.
    assert not re.search(r"^#\s*syntax\s*=", path.read_text(), re.MULTILINE | re.IGNORECASE)


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_bases_are_pinned_args_shared_by_every_dockerfile(path: Path) -> None:
    df = parse_dockerfile(path)
    service_args = parse_dockerfile(SERVICE_DOCKERFILE).global_args
    for name in ("PYTHON_IMAGE", "UV_IMAGE"):
        assert df.global_args[name] == service_args[name], f"{name}: one base for every image"
    assert df.global_args["PYTHON_IMAGE"].startswith("python:3.11-slim")
    uv_version = df.global_args["UV_IMAGE"].removeprefix(UV_IMAGE + ":")
    assert re.fullmatch(r"\d+\.\d+\.\d+", uv_version), f"uv image tag {uv_version!r}"
    # The venv's interpreter is the builder's: both stages must be the same image.
    assert df.stage("builder").base == df.final.base == df.global_args["PYTHON_IMAGE"]
    assert df.stage("uv").base == df.global_args["UV_IMAGE"]
    copies = [parse_copy(i.value) for i in df.stage("builder").all("COPY")]
    assert [(c.from_stage, c.sources) for c in copies if c.from_stage] == [("uv", ["/uv", "/uvx"])]


@pytest.mark.parametrize("service", SERVICES)
def test_runs_as_a_fixed_numeric_non_root_user(service: str) -> None:
    df = dockerfile(service)
    user = df.final.last("USER")
    assert user is not None, "the runtime stage must set USER"
    match = re.fullmatch(r"(\d+)(?::(\d+))?", user.value.strip())
    assert match, f"USER {user.value} must be numeric so runAsNonRoot can verify it"
    uid = int(match.group(1))
    assert uid != 0, "root"
    assert match.group(2) is None or int(match.group(2)) != 0, "root group"
    created = " ".join(i.value for i in df.final.all("RUN"))
    assert re.search(rf"useradd\b[^&;]*--uid {uid}\b", created), "useradd --uid <USER>"
    assert all(i.line < user.line for i in df.final.all("RUN")), "nothing runs as root after"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.relative_to(REPO_ROOT).as_posix())
def test_no_secret_in_env_or_build_args_and_the_ca_bundle_is_a_build_secret(path: Path) -> None:
    df = parse_dockerfile(path)
    assert not df.instructions("ADD"), "COPY only: ADD fetches URLs and unpacks archives"
    values = dict(df.global_args)
    for stage in df.stages:
        values.update(stage.env())
        for arg in stage.all("ARG"):
            key, _, default = arg.value.partition("=")
            values[key.strip()] = default.strip()
    leaked = {k: v for k, v in values.items() if SECRET_NAME.search(k) and v}
    assert not leaked, f"secrets come from the environment at run time: {sorted(leaked)}"
    # The CA bundle reaches uv as a BuildKit secret, never as a file or variable of a layer.
    assert "SSL_CERT_FILE" not in values
    for _, text, flags in uv_syncs(df):
        assert "--mount=type=secret,id=ca-bundle,target=/run/secrets/ca-bundle" in flags, text
        assert "export SSL_CERT_FILE=/run/secrets/ca-bundle" in text, text
    for instruction in df.instructions("COPY"):
        assert "cert" not in instruction.value.lower(), instruction.value


@pytest.mark.parametrize("service", SERVICES)
def test_every_copy_source_is_in_the_build_context(service: str) -> None:
    ignore = DockerIgnore.load()
    for instruction in dockerfile(service).instructions("COPY"):
        copy = parse_copy(instruction.value)
        if copy.from_stage is not None:
            continue
        for source in copy.sources:
            assert "$" not in source, f"line {instruction.line}: unsubstituted {source}"
            path = REPO_ROOT / source
            assert path.exists(), f"line {instruction.line}: COPY {source}: no such path"
            assert not ignore.excludes(source), f"COPY {source}: excluded by .dockerignore"
            assert ignore.files_under(path), f"COPY {source}: .dockerignore leaves nothing"


@pytest.mark.parametrize("service", SERVICES)
def test_copies_every_member_pyproject_but_only_the_source_it_needs(service: str) -> None:
    members = workspace_members()
    copied: set[str] = set()
    for instruction in dockerfile(service).stage("builder").all("COPY"):
        copy = parse_copy(instruction.value)
        if copy.from_stage is None:
            copied.update(str(PurePosixPath(s)) for s in copy.sources)
    # uv checks uv.lock against every member's metadata, so all of them must be there.
    assert {"pyproject.toml", "uv.lock"} <= copied
    for path in members.values():
        assert f"{path.as_posix()}/pyproject.toml" in copied, f"{path}/pyproject.toml"
    needed = workspace_closure(service)
    assert "courier-common" in needed
    source_copies = {s for s in copied if not s.endswith(("pyproject.toml", "uv.lock"))}
    assert source_copies == {f"{members[name].as_posix()}/src" for name in needed}


@pytest.mark.parametrize("service", SERVICES)
def test_dependencies_layer_comes_before_the_code(service: str) -> None:
    df = dockerfile(service)
    builder = df.stage("builder").instructions
    syncs = uv_syncs(df)
    assert len(syncs) == 2, "one sync for the dependencies, one for the code"
    (deps_at, deps, _), (code_at, code, _) = syncs
    first_code_copy = next(
        n
        for n, i in enumerate(builder)
        if i.name == "COPY" and any(s.endswith("/src") for s in parse_copy(i.value).sources)
    )
    assert deps_at < first_code_copy < code_at
    assert "--no-install-workspace" in deps
    assert "--no-editable" in code, "the runtime stage gets the venv, not the source tree"
    for text, flags in ((deps, syncs[0][2]), (code, syncs[1][2])):
        assert "--locked" in text, "uv.lock is the truth: fail if it is stale"
        assert "--no-dev" in text
        assert '--package "$PACKAGE"' in text
        assert "--mount=type=cache,target=/root/.cache/uv" in flags, "reuse uv's cache"
    env = df.stage("builder").env()
    assert env.get("UV_COMPILE_BYTECODE") == "1"
    assert env.get("UV_LINK_MODE") == "copy"  # the cache is a mount, hard links cannot cross
    assert env.get("UV_PYTHON_DOWNLOADS") == "never"  # the base image's Python, nothing else


@pytest.mark.parametrize("service", SERVICES)
def test_runtime_copies_the_builders_venv_and_runs_the_services_script(service: str) -> None:
    df = dockerfile(service)
    venv = df.stage("builder").env()["UV_PROJECT_ENVIRONMENT"]
    copies = [parse_copy(i.value) for i in df.final.all("COPY")]
    assert [(c.from_stage, c.sources, c.dest) for c in copies] == [("builder", [venv], venv)]
    env = df.final.env()
    assert env["PATH"].split(":")[0] == f"{venv}/bin"
    assert env["COURIER_HTTP_HOST"] == "0.0.0.0"
    assert env["COURIER_LOG_FORMAT"] == "json"
    assert env["PYTHONUNBUFFERED"] == "1"
    # Exec form, so the script is PID 1 and gets SIGTERM; the link names PACKAGE's script.
    entrypoint = df.final.last("ENTRYPOINT")
    assert entrypoint is not None
    assert json.loads(entrypoint.value) == ["courier-service"]
    (_, code, _) = uv_syncs(df)[1]
    assert f'ln -s "$PACKAGE" {venv}/bin/courier-service' in code
    scripts = read_pyproject(REPO_ROOT / "services" / service)["project"]["scripts"]
    assert scripts[service].startswith(f"{package_of(service)}.main:")
    exposed = [int(p.split("/")[0]) for i in df.final.all("EXPOSE") for p in i.value.split()]
    assert exposed == [service_port(service)]


def test_dockerignore_keeps_the_build_context_small_and_clean() -> None:
    ignore = DockerIgnore.load()
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "var/sinks/smtp.jsonl",
        "var/images/build.json",
        "tests/support/images.py",
        "charts/courier/Chart.yaml",
        "k8s/README.md",
        "bench/results/run.json",
        "docker/service.Dockerfile",
        "services/user-service/tests/test_api.py",
        "services/user-service/README.md",
        "libs/common/tests/conftest.py",
        "libs/common/src/courier_common/__pycache__/settings.cpython-311.pyc",
        "tools/sinks/tests/test_cli.py",
        "tools/sinks/README.md",
        ".env",
        "services/user-service/.env",
        "README.md",
    ]:
        assert ignore.excludes(path), f"{path} must not reach the build context"
    for path in [
        "pyproject.toml",
        "uv.lock",
        "tools/sinks/src/courier_sinks/__init__.py",  # the dev-only sinks image
        "libs/common/pyproject.toml",
        "libs/common/src/courier_common/settings.py",
        "services/notification-service/src/notification_service/templates/en/welcome.txt.j2",
        "tools/sinks/pyproject.toml",
    ]:
        assert not ignore.excludes(path), f"{path} is needed by the builds"


def test_dockerignore_names_each_member_folder_before_its_wildcards() -> None:
    """Debian 12's docker.io (20.10) BuildKit drops `!libs/*/src` unless `libs/common` itself
    was re-included first: every member folder is named literally, above the wildcards."""
    lines = [
        ln.strip()
        for ln in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    first_wildcard = min(
        n for n, ln in enumerate(lines) if ln.startswith("!") and "*" in ln and "/" in ln
    )
    literal = set(lines[:first_wildcard])
    for path in workspace_members().values():
        assert f"!{path.as_posix()}" in literal, f".dockerignore: add !{path.as_posix()}"
