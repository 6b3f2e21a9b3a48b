"""The Dockerfiles, read without an engine (tests/images builds and runs them for real).

``parse_dockerfile`` splits a Dockerfile (parsed by dockerfile-parse) into its stages, with
build arguments substituted; ``DockerIgnore`` answers which paths of the repository reach the
build context under Docker's documented rules.
"""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from dockerfile_parse import DockerfileParser  # type: ignore[import-untyped]
from dockerfile_parse.util import get_key_val_dictionary  # type: ignore[import-untyped]

REPO_ROOT = Path(__file__).resolve().parents[2]
#: The one Dockerfile of the three services (--build-arg PACKAGE=<service>).
SERVICE_DOCKERFILE = REPO_ROOT / "docker" / "service.Dockerfile"
#: The dev-only sinks image.
SINKS_DOCKERFILE = REPO_ROOT / "tools" / "sinks" / "Dockerfile"

#: The image that provides uv itself.
UV_IMAGE = "ghcr.io/astral-sh/uv"


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


def substitute(value: str, args: dict[str, str]) -> str:
    """``$NAME`` / ``${NAME}`` replaced by the build argument's value (unknown ones kept)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def parse_dockerfile(path: Path, build_args: dict[str, str] | None = None) -> Dockerfile:
    """The stages of a Dockerfile; with ``build_args``, ``$ARG`` in COPY, EXPOSE and LABEL
    is replaced as the builder would (global ARG defaults in FROM, always)."""
    parser = DockerfileParser(path=str(path), cache_content=True)
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for item in parser.structure:
        name, value, line = item["instruction"], item["value"], item["startline"] + 1
        if name == "COMMENT":
            continue
        if build_args and name in {"COPY", "EXPOSE", "LABEL"}:
            value = substitute(value, build_args)
        if name == "FROM":
            words = value.split()
            image = substitute(words[0], {**global_args, **(build_args or {})})
            alias = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(name=alias, base=image))
        elif not stages:
            if name != "ARG":
                raise ValueError(f"{path}:{line}: {name} before the first FROM")
            arg, _, default = value.partition("=")
            global_args[arg.strip()] = default.strip().strip('"')
            if build_args and arg.strip() in build_args:
                global_args[arg.strip()] = build_args[arg.strip()]
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
