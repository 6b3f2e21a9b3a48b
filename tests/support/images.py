"""The services' Dockerfiles, read and replayed without docker.

``parse_dockerfile`` splits a Dockerfile (parsed by dockerfile-parse) into its stages;
``DockerIgnore`` answers which paths of the repository reach the build context;
``replay_builder`` runs a builder stage's COPY, WORKDIR, ENV and ``uv`` RUN steps in a
directory that stands in for the image's filesystem, with the machine's uv and its cache.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]
from dockerfile_parse.util import get_key_val_dictionary  # type: ignore[import-untyped]

REPO_ROOT = Path(__file__).resolve().parents[2]

#: The image that provides uv itself: replaying a COPY from it means using the local uv.
UV_IMAGE = "ghcr.io/astral-sh/uv"

#: Environment variables whose value is a path inside the image; the replay maps them.
_IMAGE_PATH_VARIABLES = frozenset({"UV_PROJECT_ENVIRONMENT"})


@dataclass(frozen=True)
class Instruction:
    name: str  # upper case: FROM, COPY, RUN, ...
    value: str
    line: int  # 1-based


@dataclass
class Stage:
    name: str | None
    base: str  # the image reference, build args substituted
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, name: str) -> list[Instruction]:
        return [i for i in self.instructions if i.name == name]

    def last(self, name: str) -> Instruction | None:
        found = self.all(name)
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        """The stage's ENV values, later ones winning, with no ``$VAR`` substitution."""
        env: dict[str, str] = {}
        for instruction in self.all("ENV"):
            env.update(key_values(instruction.value))
        return env


@dataclass
class Dockerfile:
    path: Path
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise KeyError(f"{self.path}: no stage named {name!r}")

    def instructions(self, name: str) -> list[Instruction]:
        return [i for stage in self.stages for i in stage.all(name)]


def key_values(value: str) -> dict[str, str]:
    """``KEY=value KEY2="v 2"`` (or the legacy ``KEY value``) as a dict."""
    pairs: dict[str, str] = get_key_val_dictionary(value, env_replace=False)
    return pairs


def parse_dockerfile(path: Path) -> Dockerfile:
    parser = DockerfileParser(path=str(path), cache_content=True)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for item in parser.structure:
        name, value, line = item["instruction"], item["value"], item["startline"] + 1
        if name == "COMMENT":
            continue
        if name == "FROM":
            words = value.split()
            image = re.sub(
                r"\$\{?(\w+)\}?", lambda m: global_args.get(m.group(1), m.group(0)), words[0]
            )
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name=alias, base=image))
        elif not stages:
            if name != "ARG":
                raise ValueError(f"{path}:{line}: {name} before the first FROM")
            arg, _, default = value.partition("=")
            global_args[arg.strip()] = default.strip().strip('"')
        else:
            stages[-1].instructions.append(Instruction(name, value, line))
    return Dockerfile(path=path, global_args=global_args, stages=stages)


@dataclass(frozen=True)
class Copy:
    sources: list[str]
    dest: str
    flags: dict[str, str]

    @property
    def from_stage(self) -> str | None:
        return self.flags.get("from")


def parse_copy(value: str) -> Copy:
    flags: dict[str, str] = {}
    words = shlex.split(value)
    while words and words[0].startswith("--"):
        flag, _, flag_value = words.pop(0)[2:].partition("=")
        flags[flag] = flag_value
    rest = " ".join(words)
    paths: list[str] = json.loads(rest) if rest.startswith("[") else words
    if len(paths) < 2:
        raise ValueError(f"COPY needs a source and a destination: {value!r}")
    return Copy(sources=paths[:-1], dest=paths[-1], flags=flags)


@dataclass(frozen=True)
class Run:
    flags: list[str]  # --mount=..., --network=...
    argv: list[str]


def parse_run(value: str) -> Run:
    words = shlex.split(value)
    flags = []
    while words and words[0].startswith("--"):
        flags.append(words.pop(0))
    return Run(flags=flags, argv=words)


class DockerIgnore:
    """``.dockerignore`` with Docker's rules: patterns in order, ``!`` re-includes, the last
    match wins, ``**`` spans folders, and a pattern that matches a folder covers what is
    inside it."""

    def __init__(self, patterns: list[str]) -> None:
        self.rules: list[tuple[bool, list[str]]] = []
        for raw in patterns:
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            include = line.startswith("!")
            pattern = str(PurePosixPath(line.removeprefix("!").strip().lstrip("/")))
            self.rules.append((include, pattern.split("/")))

    @classmethod
    def load(cls, root: Path = REPO_ROOT) -> DockerIgnore:
        path = root / ".dockerignore"
        return cls(path.read_text().splitlines() if path.exists() else [])

    def excludes(self, relpath: str | Path) -> bool:
        parts = PurePosixPath(relpath).parts
        prefixes = [parts[:n] for n in range(1, len(parts) + 1)]
        excluded = False
        for include, pattern in self.rules:
            if any(_match(pattern, list(prefix)) for prefix in prefixes):
                excluded = not include
        return excluded

    def files_under(self, path: Path, root: Path = REPO_ROOT) -> list[Path]:
        """The files at or below ``path`` (absolute) that reach the build context."""
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [p for p in candidates if not self.excludes(p.relative_to(root).as_posix())]


def _match(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_match(pattern[1:], parts[n:]) for n in range(len(parts) + 1))
    if not parts or not fnmatch.fnmatchcase(parts[0], pattern[0]):
        return False
    return _match(pattern[1:], parts[1:])


# ---- the workspace ------------------------------------------------------------------------


def read_pyproject(directory: Path) -> dict[str, Any]:
    with (directory / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def workspace_members(root: Path = REPO_ROOT) -> dict[str, Path]:
    """Project name → member folder (relative to ``root``), from the workspace's globs."""
    globs = read_pyproject(root)["tool"]["uv"]["workspace"]["members"]
    members: dict[str, Path] = {}
    for pattern in globs:
        for directory in sorted(root.glob(pattern)):
            if (directory / "pyproject.toml").is_file():
                name = normalize(read_pyproject(directory)["project"]["name"])
                members[name] = directory.relative_to(root)
    return members


def workspace_closure(name: str, root: Path = REPO_ROOT) -> set[str]:
    """``name`` and every workspace member it depends on, directly or not."""
    members = workspace_members(root)
    needed: set[str] = set()
    todo = [normalize(name)]
    while todo:
        current = todo.pop()
        if current in needed:
            continue
        needed.add(current)
        for requirement in read_pyproject(root / members[current])["project"].get(
            "dependencies", []
        ):
            match = re.match(r"[A-Za-z0-9._-]+", requirement)
            if match and normalize(match.group(0)) in members:
                todo.append(normalize(match.group(0)))
    return needed


def default_http_port(config_py: Path) -> int:
    """The default of ``http_port`` in the ``Settings`` class of a service's config.py."""
    tree = ast.parse(config_py.read_text())
    for node in ast.walk(tree):
        if not (isinstance(node, ast.ClassDef) and node.name == "Settings"):
            continue
        for statement in node.body:
            if (
                isinstance(statement, ast.AnnAssign)
                and isinstance(statement.target, ast.Name)
                and statement.target.id == "http_port"
                and statement.value is not None
            ):
                value = statement.value
                if isinstance(value, ast.Call):
                    value = next(k.value for k in value.keywords if k.arg == "default")
                if isinstance(value, ast.Constant) and isinstance(value.value, int):
                    return value.value
    raise LookupError(f"{config_py}: no Settings.http_port default")


# ---- replaying a builder stage ------------------------------------------------------------


class ReplayError(AssertionError):
    pass


def uv_executable() -> str:
    """The uv running this test session (``uv run`` exports it as ``UV``), else uv on PATH."""
    found = os.environ.get("UV") or shutil.which("uv")
    if not found:
        raise ReplayError("uv is needed to replay the image's builder stage")
    return found


def in_rootfs(rootfs: Path, image_path: str) -> Path:
    return rootfs / PurePosixPath(image_path).relative_to("/")


def replay_builder(
    dockerfile: Dockerfile,
    stage_name: str,
    rootfs: Path,
    *,
    context: Path = REPO_ROOT,
    timeout: float = 300.0,
) -> list[list[str]]:
    """Run ``stage_name``'s COPY, WORKDIR, ENV and ``uv ...`` RUN steps with ``rootfs``
    standing in for ``/``. COPY sources are filtered by ``.dockerignore`` exactly as the
    build context is. Returns the commands that ran; any step that cannot be replayed
    faithfully raises ``ReplayError``."""
    stage = dockerfile.stage(stage_name)
    ignore = DockerIgnore.load(context)
    uv = uv_executable()
    workdir = PurePosixPath("/")
    stage_env: dict[str, str] = {}
    ran: list[list[str]] = []
    for instruction in stage.instructions:
        where = f"{dockerfile.path}:{instruction.line}"
        if instruction.name == "WORKDIR":
            workdir = workdir / instruction.value
            in_rootfs(rootfs, str(workdir)).mkdir(parents=True, exist_ok=True)
        elif instruction.name == "ENV":
            stage_env.update(key_values(instruction.value))
        elif instruction.name == "COPY":
            copy = parse_copy(instruction.value)
            if copy.from_stage is not None:
                if not copy.from_stage.startswith(UV_IMAGE + ":"):
                    raise ReplayError(f"{where}: cannot replay a COPY from {copy.from_stage}")
                continue  # uv itself: the replay uses the machine's uv
            _copy_into(copy, context, ignore, in_rootfs(rootfs, str(workdir / copy.dest)))
        elif instruction.name == "RUN":
            run = parse_run(instruction.value)
            if not run.argv or run.argv[0] != "uv" or "&&" in run.argv or ";" in run.argv:
                raise ReplayError(f"{where}: only single `uv ...` RUN steps can be replayed")
            env = _clean_environment()
            for key, value in stage_env.items():
                if key == "PATH":
                    continue
                env[key] = str(in_rootfs(rootfs, value)) if key in _IMAGE_PATH_VARIABLES else value
            result = subprocess.run(
                [uv, *run.argv[1:]],
                cwd=in_rootfs(rootfs, str(workdir)),
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
            if result.returncode != 0:
                raise ReplayError(f"{where}: `{shlex.join(run.argv)}` failed:\n{result.stderr}")
            ran.append(run.argv)
        elif instruction.name in {"ADD", "USER", "SHELL", "ONBUILD"}:
            raise ReplayError(f"{where}: {instruction.name} in a builder stage is not replayed")
        # ARG, LABEL, EXPOSE, ... change no files.
    return ran


def _copy_into(copy: Copy, context: Path, ignore: DockerIgnore, dest: Path) -> None:
    into_folder = copy.dest.endswith("/") or len(copy.sources) > 1
    for source in copy.sources:
        if any(ch in source for ch in "*?["):
            raise ReplayError(f"COPY {source}: wildcards flatten folders; name each path")
        src = context / source
        files = ignore.files_under(src, context)
        if not files:
            raise ReplayError(f"COPY {source}: nothing of it is in the build context")
        for file in files:
            if src.is_dir():
                target = dest / file.relative_to(src)
            else:
                target = dest / src.name if into_folder else dest
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, target)


def _clean_environment() -> dict[str, str]:
    """This process's environment without what points uv or Python at the repo's venv."""
    return {
        key: value
        for key, value in os.environ.items()
        if key not in {"VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME", "UV"}
        and not (key.startswith("UV_") and key != "UV_CACHE_DIR")
    }
