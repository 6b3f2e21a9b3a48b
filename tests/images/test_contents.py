"""What the built images hold: each image's size and layers (reported), nothing but the venv
on top of the base, no secret, test file or cache in any layer, only the packages a service
needs, and a build context that is exactly what .dockerignore allows on this engine."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest

from scripts.images import SERVICES
from tests.images.conftest import Engine
from tests.support.images import (
    REPO_ROOT,
    DockerIgnore,
    normalize,
    workspace_closure,
    workspace_members,
)

COURIER_PACKAGES = ("courier_common", "user_service", "notification_service", "dlq_archiver")
#: Shapes of credentials that must never be in a layer.
TOKEN_PATTERNS = [
    # a key itself (base64 follows), not the marker string a TLS library parses for
    rb"-----BEGIN (?:RSA |EC |DSA |OPENSSH |ENCRYPTED )?PRIVATE KEY-----\r?\n[A-Za-z0-9+/]{40}",
    rb"\bsk_live_[0-9A-Za-z]{16,}",
    rb"\bghp_[0-9A-Za-z]{36}\b",
    rb"\bAKIA[0-9A-Z]{16}\b",
    rb"\bxox[abp]-[0-9A-Za-z-]{10,}",
]
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
PEM = re.compile(rb"-----BEGIN CERTIFICATE-----\s+(.+?)-----END CERTIFICATE-----", re.S)


def _pem_bodies(data: bytes) -> set[bytes]:
    return {b"".join(m.group(1).split()) for m in PEM.finditer(data)}


def _layers(engine: Engine, ref: str, into: Path) -> Iterator[tuple[int, str, tarfile.TarFile]]:
    """(position, layer id, its tar) for each layer of the image, base first (`docker save`)."""
    archive = into / "image.tar"
    engine.run("save", "-o", str(archive), ref, timeout=600)
    with tarfile.open(archive) as outer:
        (manifest,) = json.load(outer.extractfile("manifest.json"))  # type: ignore[arg-type]
        for position, layer in enumerate(manifest["Layers"]):
            member = outer.extractfile(layer)
            assert member is not None, layer
            with tarfile.open(fileobj=io.BytesIO(member.read())) as inner:
                yield position, layer.split("/")[0], inner


def _repo_test_file_hashes() -> dict[str, str]:
    """sha256 → path of every test file of the source tree (big enough to be unique)."""
    hashes: dict[str, str] = {}
    roots = [REPO_ROOT / "tests", REPO_ROOT / "conftest.py"]
    roots += [p for p in REPO_ROOT.glob("*/*/tests") if p.is_dir()]
    roots += [REPO_ROOT / "libs" / "common" / "tests"]
    for root in roots:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for path in files:
            if "__pycache__" in path.parts or path.stat().st_size < 200:
                continue
            hashes[hashlib.sha256(path.read_bytes()).hexdigest()] = str(path.relative_to(REPO_ROOT))
    return hashes


@pytest.fixture(scope="module")
def ca_needles(engine: Engine, images: dict[str, str]) -> set[bytes]:
    """The certificates this machine trusts beyond the base image's own bundle (a
    TLS-inspecting proxy's CA): the build secret's content that no layer may hold."""
    if not HOST_CA_BUNDLE.is_file():
        return set()
    base = engine.run(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "cat",
        images["user-service"],
        str(HOST_CA_BUNDLE),
    ).stdout.encode()
    extra = _pem_bodies(HOST_CA_BUNDLE.read_bytes()) - _pem_bodies(base)
    return {body[:64] for body in extra}


def _layer_rows(engine: Engine, ref: str) -> list[dict[str, Any]]:
    out = engine.run("history", "--no-trunc", "--human=false", "--format", "{{json .}}", ref)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def test_report_size_and_layers_and_only_the_venv_above_the_base(
    engine: Engine, images: dict[str, str], build_report: dict[str, Any], report_dir: Path
) -> None:
    seconds = {b["image"]: b["seconds"] for b in build_report["images"]}
    summary = [
        "| image | size (MB) | layers | above the base | build (s) |",
        "|---|---|---|---|---|",
    ]
    details: list[str] = []
    base_ref = next(iter(build_report["bases"]))
    base_layers = engine.inspect(base_ref)["RootFS"]["Layers"]
    for ref in images.values():
        info = engine.inspect(ref)
        layers = info["RootFS"]["Layers"]
        assert layers[: len(base_layers)] == base_layers, f"{ref} is not on {base_ref}"
        history = _layer_rows(engine, ref)  # newest first; the base's own rows last
        ours = history[: len(history) - len(engine.inspect(base_ref)["RootFS"]["Layers"])]
        filled = [r for r in ours if int(r["Size"]) > 0]
        # Above the base: the user (useradd) and the venv, nothing else with any bytes.
        assert len(filled) == 2, [r["CreatedBy"] for r in filled]
        assert "COPY /app/.venv /app/.venv" in filled[0]["CreatedBy"], filled[0]
        assert "useradd --uid 10001" in filled[1]["CreatedBy"], filled[1]
        summary.append(
            f"| {ref} | {int(info['Size']) / 1e6:.1f} | {len(layers)} | "
            f"{sum(int(r['Size']) for r in filled) / 1e6:.1f} MB | {seconds[ref]:.1f} |"
        )
        details += [f"\n### {ref}\n", "| size (MB) | created by |", "|---|---|"]
        for row in history:
            what = re.sub(r"\s+", " ", row["CreatedBy"]).replace("|", "\\|")
            what = what if len(what) <= 110 else what[:107] + "..."
            details.append(f"| {int(row['Size']) / 1e6:.2f} | {what or '(base image)'} |")
    bases = "\n".join(f"- {ref}: {how}" for ref, how in build_report["bases"].items())
    text = (
        f"# Courier images\n\nBuilt with {build_report['client']} in {build_report['seconds']} s "
        f"(`make images`). Bases:\n{bases}\n\n" + "\n".join(summary) + "\n" + "\n".join(details)
    )
    (report_dir / "layers.md").write_text(text + "\n")
    print(text)


@pytest.mark.parametrize("name", [*SERVICES, "sinks"])
def test_no_layer_holds_a_secret_a_test_or_a_cache(
    engine: Engine,
    images: dict[str, str],
    build_report: dict[str, Any],
    ca_needles: set[bytes],
    name: str,
) -> None:
    """Every layer: no CA bundle of the build, no test file, no .git, no uv cache, nothing in
    /app but the venv. Credential shapes are looked for in the layers Courier adds (the base's
    own libraries carry self-test keys, e.g. GnuTLS's)."""
    base_ref = next(iter(build_report["bases"]))
    base_count = len(engine.inspect(base_ref)["RootFS"]["Layers"])
    tests = _repo_test_file_hashes()
    assert tests, "the source tree has test files to look for"
    bundle = (
        hashlib.sha256(HOST_CA_BUNDLE.read_bytes()).hexdigest() if HOST_CA_BUNDLE.is_file() else ""
    )
    token = re.compile(b"|".join(TOKEN_PATTERNS))
    found: list[str] = []
    scanned = 0
    with tempfile.TemporaryDirectory(prefix="courier-layers-") as tmp:
        for position, layer, tar in _layers(engine, images[name], Path(tmp)):
            for member in tar:
                path = PurePosixPath(member.name.removeprefix("./"))
                where = f"{layer[:12]}:/{path}"
                parts = path.parts
                if ".git" in parts:
                    found.append(f"{where}: a .git folder")
                if any(parts[i : i + 2] == (".cache", "uv") for i in range(len(parts))):
                    found.append(f"{where}: uv's cache")
                if parts[:1] == ("run",) and "secrets" in parts:
                    found.append(f"{where}: a build secret's mount point")
                if parts[:1] == ("app",) and len(parts) > 1 and parts[1] != ".venv":
                    found.append(f"{where}: the source tree (only /app/.venv belongs in /app)")
                if any(p in COURIER_PACKAGES for p in parts) and {"tests", "test"} & set(parts):
                    found.append(f"{where}: Courier's tests")
                if not member.isfile():
                    continue
                handle = tar.extractfile(member)
                assert handle is not None
                data = handle.read()
                scanned += len(data)
                digest = hashlib.sha256(data).hexdigest()
                if digest in tests:
                    found.append(f"{where}: the test file {tests[digest]}")
                if digest == bundle:
                    found.append(f"{where}: the build's CA bundle")
                if any(needle in data for needle in ca_needles):
                    found.append(f"{where}: a certificate of the build secret")
                if position >= base_count and (match := token.search(data)):
                    found.append(f"{where}: a credential ({match.group(0)[:12]!r}...)")
    assert scanned > 50_000_000, f"read only {scanned} bytes of {images[name]}"
    assert not found, "\n".join(found)


@pytest.mark.parametrize("service", sorted(SERVICES))
def test_the_venv_holds_what_the_service_needs_and_nothing_else(
    engine: Engine, images: dict[str, str], service: str
) -> None:
    package = service.replace("-", "_")
    others = sorted(
        normalize(n).replace("-", "_")
        for n in workspace_members()
        if n not in workspace_closure(service)
    )
    result = engine.run(
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        "--user",
        "10001:10001",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--entrypoint",
        "python",
        images[service],
        "-I",
        "-c",
        PROBE,
        service,
        package,
        *others,
    )
    seen = json.loads(result.stdout)
    assert seen["entry_point_callable"], seen
    assert seen["link"] == service, "courier-service (the ENTRYPOINT) runs the service's script"
    for module in (package, "courier_common"):
        assert seen["files"][module].startswith("/app/.venv/lib/"), seen["files"][module]
    absent = {m for m in [*others, "pytest", "mypy", "hypothesis"] if seen["present"][m]}
    assert not absent, f"not needed by {service}: {sorted(absent)}"
    source = REPO_ROOT / "services" / service / "src" / package
    data = sorted(
        p.relative_to(source).as_posix()
        for p in source.rglob("*")
        if p.is_file() and p.suffix not in {".py", ".pyc"} and "__pycache__" not in p.parts
    )
    missing = [p for p in data if p not in seen["package_files"]]
    assert not missing, f"package data missing from the image: {missing}"
    if service == "notification-service":
        assert any(p.endswith(".j2") for p in data)


# Runs inside the image (python -I: no cwd, no PYTHONPATH, no user site).
PROBE = """
import importlib, importlib.metadata, importlib.util, json, os, pathlib, sys
script, package, *others = sys.argv[1:]
(entry,) = [e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == script]
target = entry.load()
importlib.import_module(package + ".main")
names = [package, "courier_common", *others, "pytest", "mypy", "hypothesis"]
present = {name: importlib.util.find_spec(name) is not None for name in names}
files = {name: importlib.import_module(name).__file__ for name in (package, "courier_common")}
root = pathlib.Path(files[package]).parent
package_files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
print(json.dumps({
    "entry_point_callable": callable(target), "present": present, "files": files,
    "link": os.readlink("/app/.venv/bin/courier-service"), "package_files": package_files,
}))
"""


def test_the_build_context_is_what_dockerignore_allows_on_this_engine(
    engine: Engine, build_report: dict[str, Any]
) -> None:
    """Build a throwaway image whose only step copies the context, and compare its files with
    .dockerignore's rules: the engine's own matcher, not a model of it."""
    python = next(ref for ref in build_report["bases"] if ref.startswith("python:"))
    ignore = DockerIgnore.load()
    expected = {"pyproject.toml", "uv.lock"}
    for top in ("libs", "services", "tools"):
        for path in (REPO_ROOT / top).rglob("*"):
            relative = path.relative_to(REPO_ROOT).as_posix()
            if path.is_file() and not ignore.excludes(relative):
                expected.add(relative)
    assert "libs/common/src/courier_common/__init__.py" in expected
    with tempfile.TemporaryDirectory(prefix="courier-context-") as tmp:
        dockerfile = Path(tmp) / "Dockerfile"
        dockerfile.write_text(
            f"FROM {python}\nCOPY . /context\n"
            "RUN cd /context && find . -type f | sed 's|^./||' | sort > /context.txt\n"
        )
        tag = "courier-test/context:probe"
        engine.run(
            "build", "-q", "--network", "none", "-f", str(dockerfile), "-t", tag, str(REPO_ROOT)
        )
        try:
            listed = engine.run("run", "--rm", "--network", "none", tag, "cat", "/context.txt")
        finally:
            engine.run("rmi", "-f", tag, check=False)
    actual = set(listed.stdout.split())
    assert actual - expected == set(), (
        f"in the context but not allowed: {sorted(actual - expected)[:20]}"
    )
    assert expected - actual == set(), f"allowed but left out: {sorted(expected - actual)[:20]}"
