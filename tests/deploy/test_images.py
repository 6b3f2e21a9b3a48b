"""The service images: what each Dockerfile promises, checked without a docker engine.

Static checks read the Dockerfiles with dockerfile-parse. ``test_builder_stage_replays``
runs each builder stage's own COPY and ``uv sync`` steps for real (with uv's local cache),
then looks inside the venv the runtime stage would copy.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
from pathlib import Path, PurePosixPath

import pytest

from tests.support.images import (
    REPO_ROOT,
    UV_IMAGE,
    Dockerfile,
    DockerIgnore,
    default_http_port,
    in_rootfs,
    normalize,
    parse_copy,
    parse_dockerfile,
    parse_run,
    read_pyproject,
    replay_builder,
    workspace_closure,
    workspace_members,
)

SERVICES = sorted(p.parent.name for p in (REPO_ROOT / "services").glob("*/Dockerfile"))
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|PRIVATE_KEY|API_KEY|CREDENTIAL", re.I)


def dockerfile(service: str) -> Dockerfile:
    return parse_dockerfile(REPO_ROOT / "services" / service / "Dockerfile")


def uv_sync_runs(df: Dockerfile) -> list[tuple[int, list[str], list[str]]]:
    """(position in the builder stage, argv, RUN flags) of every ``uv sync``."""
    found = []
    for position, instruction in enumerate(df.stages[0].instructions):
        if instruction.name == "RUN":
            run = parse_run(instruction.value)
            if run.argv[:2] == ["uv", "sync"]:
                found.append((position, run.argv, run.flags))
    return found


def package_of(service: str) -> str:
    return service.replace("-", "_")


def test_every_service_has_a_dockerfile() -> None:
    assert SERVICES == ["dlq-archiver", "notification-service", "user-service"]


@pytest.mark.parametrize("service", SERVICES)
def test_is_multi_stage_on_a_pinned_python_slim_base(service: str) -> None:
    df = dockerfile(service)
    assert len(df.stages) >= 2, "builder and runtime stages"
    assert df.final.base.startswith("python:3.11-slim"), df.final.base
    # The venv's interpreter is the builder's: both stages must be the same image.
    assert df.stages[0].base == df.final.base
    for stage in df.stages:
        tag = stage.base.partition(":")[2]
        assert tag, f"{stage.base} is not pinned"
        assert tag != "latest", f"{stage.base} is not pinned"


@pytest.mark.parametrize("service", SERVICES)
def test_uv_comes_from_a_pinned_release_image(service: str) -> None:
    copies = [parse_copy(i.value) for i in dockerfile(service).instructions("COPY")]
    uv_copies = [c for c in copies if (c.from_stage or "").startswith(UV_IMAGE + ":")]
    assert len(uv_copies) == 1
    version = uv_copies[0].from_stage.split(":", 1)[1]  # type: ignore[union-attr]
    assert re.fullmatch(r"\d+\.\d+\.\d+", version), f"uv image tag {version!r} is not a release"
    # One uv for every image.
    tags = {
        parse_copy(i.value).from_stage
        for s in SERVICES
        for i in dockerfile(s).instructions("COPY")
        if (parse_copy(i.value).from_stage or "").startswith(UV_IMAGE)
    }
    assert len(tags) == 1, tags


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
    # The user exists in the image, with that UID.
    created = " ".join(i.value for i in df.final.all("RUN"))
    assert re.search(rf"useradd\b[^&;]*--uid {uid}\b", created), "useradd --uid <USER>"
    # Nothing after USER runs as root again.
    last_user_line = user.line
    assert all(i.line < last_user_line for i in df.final.all("RUN"))


@pytest.mark.parametrize("service", SERVICES)
def test_no_secret_in_env_or_build_args(service: str) -> None:
    df = dockerfile(service)
    assert not df.instructions("ADD"), "COPY only: ADD fetches URLs and unpacks archives"
    values = dict(df.global_args)
    for stage in df.stages:
        values.update(stage.env())
        for arg in stage.all("ARG"):
            key, _, default = arg.value.partition("=")
            values[key.strip()] = default.strip()
    leaked = {k: v for k, v in values.items() if SECRET_NAME.search(k) and v}
    assert not leaked, f"secrets come from the environment at run time: {sorted(leaked)}"


@pytest.mark.parametrize("service", SERVICES)
def test_every_copy_source_is_in_the_build_context(service: str) -> None:
    ignore = DockerIgnore.load()
    for instruction in dockerfile(service).instructions("COPY"):
        copy = parse_copy(instruction.value)
        if copy.from_stage is not None:
            continue
        for source in copy.sources:
            path = REPO_ROOT / source
            assert path.exists(), f"line {instruction.line}: COPY {source}: no such path"
            assert not ignore.excludes(source), f"COPY {source}: excluded by .dockerignore"
            assert ignore.files_under(path), f"COPY {source}: .dockerignore leaves nothing"


@pytest.mark.parametrize("service", SERVICES)
def test_copies_every_member_pyproject_but_only_the_source_it_needs(service: str) -> None:
    members = workspace_members()
    copied: set[str] = set()
    for instruction in dockerfile(service).stages[0].all("COPY"):
        copy = parse_copy(instruction.value)
        if copy.from_stage is None:
            copied.update(str(PurePosixPath(s)) for s in copy.sources)
    # uv checks uv.lock against every member's metadata, so all of them must be there.
    assert {"pyproject.toml", "uv.lock"} <= copied
    for path in members.values():
        assert f"{path.as_posix()}/pyproject.toml" in copied, f"{path}/pyproject.toml"
    # Code: exactly the service and the members it depends on.
    needed = workspace_closure(service)
    assert "courier-common" in needed
    source_copies = {s for s in copied if not s.endswith(("pyproject.toml", "uv.lock"))}
    assert source_copies == {f"{members[name].as_posix()}/src" for name in needed}


@pytest.mark.parametrize("service", SERVICES)
def test_dependencies_layer_comes_before_the_code(service: str) -> None:
    df = dockerfile(service)
    builder = df.stages[0].instructions
    syncs = uv_sync_runs(df)
    assert len(syncs) == 2, "one sync for the dependencies, one for the code"
    (deps_at, deps, deps_flags), (code_at, code, code_flags) = syncs
    first_code_copy = next(
        n
        for n, i in enumerate(builder)
        if i.name == "COPY" and any(s.endswith("/src") for s in parse_copy(i.value).sources)
    )
    assert deps_at < first_code_copy < code_at
    assert "--no-install-workspace" in deps
    assert "--no-editable" in code, "the runtime stage gets the venv, not the source tree"
    for argv, flags in ((deps, deps_flags), (code, code_flags)):
        assert "--locked" in argv, "uv.lock is the truth: fail if it is stale"
        assert "--no-dev" in argv
        assert argv[argv.index("--package") + 1] == service
        assert any(f.startswith("--mount=type=cache") for f in flags), "reuse uv's cache"
    env = df.stages[0].env()
    assert env.get("UV_COMPILE_BYTECODE") == "1"
    assert env.get("UV_LINK_MODE") == "copy"  # the cache is a mount, hard links cannot cross
    assert env.get("UV_PYTHON_DOWNLOADS") == "never"  # the base image's Python, nothing else


@pytest.mark.parametrize("service", SERVICES)
def test_runtime_copies_the_builders_venv_and_puts_it_on_path(service: str) -> None:
    df = dockerfile(service)
    venv = df.stages[0].env()["UV_PROJECT_ENVIRONMENT"]
    copies = [parse_copy(i.value) for i in df.final.all("COPY")]
    assert [(c.from_stage, c.sources, c.dest) for c in copies] == [
        (df.stages[0].name, [venv], venv)
    ], "the runtime stage gets the venv and nothing else"
    env = df.final.env()
    assert env["PATH"].split(":")[0] == f"{venv}/bin"
    assert env["COURIER_HTTP_HOST"] == "0.0.0.0"
    assert env["COURIER_LOG_FORMAT"] == "json"
    assert env["PYTHONUNBUFFERED"] == "1"


@pytest.mark.parametrize("service", SERVICES)
def test_entrypoint_is_the_services_console_script(service: str) -> None:
    df = dockerfile(service)
    entrypoint = df.final.last("ENTRYPOINT")
    assert entrypoint is not None
    argv = json.loads(entrypoint.value)  # exec form: the script is PID 1 and gets SIGTERM
    scripts = read_pyproject(REPO_ROOT / "services" / service)["project"]["scripts"]
    assert argv == [service], "the run contract: the console script is named as the service"
    assert service in scripts
    assert scripts[service].startswith(f"{package_of(service)}.main:")


@pytest.mark.parametrize("service", SERVICES)
def test_expose_is_the_default_http_port(service: str) -> None:
    df = dockerfile(service)
    config = REPO_ROOT / "services" / service / "src" / package_of(service) / "config.py"
    exposed = [int(p.split("/")[0]) for i in df.final.all("EXPOSE") for p in i.value.split()]
    assert exposed == [default_http_port(config)]


def test_dockerignore_keeps_the_build_context_small_and_clean() -> None:
    ignore = DockerIgnore.load()
    for path in [
        ".venv/bin/python",
        ".git/HEAD",
        "var/sinks/smtp.jsonl",
        "tests/support/images.py",
        "charts/courier/Chart.yaml",
        "k8s/README.md",
        "bench/results/run.json",
        "services/user-service/tests/test_api.py",
        "libs/common/tests/conftest.py",
        "libs/common/src/courier_common/__pycache__/settings.cpython-311.pyc",
        "tools/sinks/tests/test_cli.py",
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


@pytest.mark.parametrize("service", SERVICES)
def test_builder_stage_replays_into_a_venv_with_only_what_the_service_needs(
    service: str,
) -> None:
    df = dockerfile(service)
    package = package_of(service)
    with tempfile.TemporaryDirectory(prefix=f"imgtest-{service}-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        ran = replay_builder(df, df.stages[0].name or "builder", rootfs)
        assert [argv[:2] for argv in ran] == [["uv", "sync"], ["uv", "sync"]]

        # What the runtime stage copies is there.
        (venv_path,) = parse_copy(df.final.all("COPY")[0].value).sources
        venv = in_rootfs(rootfs, venv_path)
        script = venv / "bin" / service
        assert script.is_file()
        assert script.read_text().splitlines()[0] == f"#!{venv}/bin/python"

        others = sorted(
            normalize(name).replace("-", "_")
            for name in workspace_members()
            if name not in workspace_closure(service)
        )
        probe = subprocess.run(
            [str(venv / "bin" / "python"), "-I", "-c", PROBE, service, package, *others],
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert probe.returncode == 0, probe.stderr
        seen = json.loads(probe.stdout)

        assert seen["entry_point_callable"], seen
        site_packages = str(venv / "lib")
        for module in (package, "courier_common"):
            assert seen["files"][module].startswith(site_packages), (
                f"{module} must be installed in the venv, not editable: {seen['files'][module]}"
            )
        assert seen["present"][package]
        assert seen["present"]["courier_common"]
        absent = {m for m in [*others, "pytest", "mypy", "hypothesis"] if seen["present"][m]}
        assert not absent, f"not needed by {service}: {sorted(absent)}"

        # Package data (notification-service's Jinja templates) is installed with the code.
        source = REPO_ROOT / "services" / service / "src" / package
        installed = Path(seen["files"][package]).parent
        data = [
            p.relative_to(source)
            for p in source.rglob("*")
            if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
        ]
        missing = [str(p) for p in data if not (installed / p).is_file()]
        assert not missing, f"package data missing from the image: {missing}"
        if service == "notification-service":
            assert any(p.suffix == ".j2" for p in data)


# Runs inside the replayed venv (python -I: no cwd, no PYTHONPATH, no user site).
PROBE = """
import importlib, importlib.metadata, importlib.util, json, sys
script, package, *others = sys.argv[1:]
(entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == script]
target = entry.load()
importlib.import_module(package + ".main")
names = [package, "courier_common", *others, "pytest", "mypy", "hypothesis"]
present = {name: importlib.util.find_spec(name) is not None for name in names}
files = {name: importlib.import_module(name).__file__ for name in (package, "courier_common")}
print(json.dumps({"entry_point_callable": callable(target), "present": present, "files": files}))
"""
