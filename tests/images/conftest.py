"""What every image test needs: the docker client `make images` built with, and the images.

These tests run in `make test-images` only (after `make images`; the root conftest.py leaves
tests/images out of `make test`). A missing engine or image is a failure, never a skip.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from scripts.images import OUT_DIR, SERVICES, ImagesError, find_client


@dataclass(frozen=True)
class Engine:
    client: str

    def run(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [self.client, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env={**os.environ, "DOCKER_BUILDKIT": "1"},
        )
        if check and result.returncode != 0:
            pytest.fail(
                f"`docker {' '.join(args)}` failed ({result.returncode}):\n{result.stderr}",
                pytrace=False,
            )
        return result

    def inspect(self, ref: str) -> dict[str, Any]:
        (found,) = json.loads(self.run("image", "inspect", ref).stdout)
        result: dict[str, Any] = found
        return result


@pytest.fixture(scope="session")
def engine() -> Engine:
    try:
        return Engine(find_client())
    except ImagesError as error:
        pytest.fail(f"no Docker engine for the image tests: {error}", pytrace=False)


@pytest.fixture(scope="session")
def build_report() -> dict[str, Any]:
    path = OUT_DIR / "build.json"
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make images` first", pytrace=False)
    report: dict[str, Any] = json.loads(path.read_text())
    return report


@pytest.fixture(scope="session")
def images(engine: Engine, build_report: dict[str, Any]) -> dict[str, str]:
    """Name (user-service, ..., sinks) → the image reference `make images` built, checked to
    be the very image in the daemon now."""
    found: dict[str, str] = {}
    for built in build_report["images"]:
        ref = built["image"]
        name = ref.split("/", 1)[1].rsplit(":", 1)[0]
        current = engine.run("image", "inspect", "--format", "{{.Id}}", ref, check=False)
        if current.returncode != 0 or current.stdout.strip() != built["id"]:
            pytest.fail(f"{ref} is not the image `make images` built: run it again", pytrace=False)
        found[name] = ref
    missing = {*SERVICES, "sinks"} - set(found)
    if missing:
        pytest.fail(f"`make images` did not build {sorted(missing)}", pytrace=False)
    return found


@pytest.fixture(scope="session")
def report_dir() -> Path:
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    return OUT_DIR
