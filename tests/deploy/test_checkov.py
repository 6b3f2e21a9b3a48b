"""checkov on the rendered chart: 0 failed for the default, prod, keda, hpa and none values.

checkov runs from its own isolated environment (`uvx --from checkov==<pinned>`, never a project
dependency: it pins too many packages), offline (`--framework kubernetes --skip-download`,
`BC_SKIP_MAPPING=TRUE`), with the committed skips of charts/courier/checkov.yaml. Each
variant is rendered with the same helpers as the other deploy tests, one file per template,
into its own directory; the four scans run in parallel from uv's cache, offline (about 15 s
in all on two cores; the first run installs checkov from PyPI once, a few seconds more).

The dev values are not scanned: they turn NetworkPolicy off and use `pullPolicy:
IfNotPresent` on purpose (skaffold's local images), and the in-cluster RabbitMQ and Redis run
the stock images as their own low UIDs — fine for `skaffold dev`, wrong for a cluster.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

from tests.support.deploy import CHART_DIR, load_yaml_file, render

#: Pinned so CI is reproducible; bump deliberately (newest: `pip download --no-deps checkov`).
CHECKOV_VERSION = "3.3.30"
CONFIG = CHART_DIR / "checkov.yaml"
VARIANTS = ("default", "prod", "keda", "hpa", "none")
WORKLOADS = ("user-service", "notification-service", "dlq-archiver")
#: Generous: a cold `uvx` install plus a scan takes well under a minute.
TIMEOUT_SECONDS = 420

#: Checks that must have PASSED on every Courier Deployment, so a check that silently stops
#: running (renamed, skipped, unsupported kind) cannot make `failed == 0` pass.
IMPORTANT_CHECKS = {
    "CKV_K8S_8": "liveness probe",
    "CKV_K8S_9": "readiness probe",
    "CKV_K8S_10": "CPU request",
    "CKV_K8S_11": "CPU limit",
    "CKV_K8S_12": "memory request",
    "CKV_K8S_13": "memory limit",
    "CKV_K8S_15": "image pull policy Always",
    "CKV_K8S_20": "allowPrivilegeEscalation false",
    "CKV_K8S_22": "read-only root filesystem",
    "CKV_K8S_23": "no root containers",
    "CKV_K8S_28": "no NET_RAW",
    "CKV_K8S_37": "capabilities dropped",
    "CKV_K8S_38": "service account token not mounted",
    "CKV_K8S_40": "high UID",
    "CKV_K8S_31": "seccomp RuntimeDefault",
    "CKV_K8S_30": "security context",
}
#: Graph checks report on the pods checkov derives from each workload (and the test pod).
IMPORTANT_POD_CHECKS = {"CKV2_K8S_6": "covered by a NetworkPolicy"}

#: The only per-resource skips: annotations on the helm test pod (see checkov.yaml).
ANNOTATION_SKIPS = {
    ("CKV_K8S_8", "Pod.courier.courier-test-readyz"),
    ("CKV_K8S_9", "Pod.courier.courier-test-readyz"),
}


def _checkov_command() -> list[str]:
    uvx = shutil.which("uvx")
    if uvx is not None:
        return [uvx]
    uv = shutil.which("uv")
    if uv is not None:
        return [uv, "tool", "run"]
    pytest.fail(
        "checkov runs with `uvx` (part of uv), which is not on PATH: install uv "
        "(https://docs.astral.sh/uv/) or run `make test`, which sets it up.",
        pytrace=False,
    )


def _install(uvx: list[str]) -> str | None:
    """Make checkov's isolated environment available offline; None, or why it is not.

    `uvx` revalidates its cache against PyPI on every call, so the scans run `--offline`
    from the cached environment; only when that environment is missing is it installed, once
    (about 100 wheels from PyPI, a few seconds), before the parallel scans start.
    """
    probe = ["--from", f"checkov=={CHECKOV_VERSION}", "python", "-c", "import checkov"]
    cached = subprocess.run(
        [*uvx, "--offline", *probe], capture_output=True, text=True, check=False
    )
    if cached.returncode == 0:
        return None
    try:
        install = subprocess.run(
            [*uvx, *probe], capture_output=True, text=True, check=False, timeout=TIMEOUT_SECONDS
        )
    except subprocess.TimeoutExpired:
        return f"installing checkov {CHECKOV_VERSION} with uvx took more than {TIMEOUT_SECONDS} s"
    if install.returncode == 0:
        return None
    return (
        f"checkov {CHECKOV_VERSION} is not in uv's cache and `uvx` could not install it from "
        f"PyPI (exit {install.returncode}): is the network to PyPI up?\n{install.stderr[-3000:]}"
    )


def _write_render(variant: str, out: Path) -> None:
    """One file per rendered template, as `helm template --output-dir` would lay them out."""
    out.mkdir(parents=True)
    for template, text in render(variant).items():
        if template.endswith((".yaml", ".yml")) and text.strip():
            (out / template.replace("/", "__")).write_text(text)


def _scans() -> dict[str, dict[str, Any]]:
    """checkov's JSON report per variant; fails the test with checkov's own words otherwise."""
    reports, problems = _run_scans()
    if problems:
        pytest.fail("\n\n".join(problems), pytrace=False)
    return reports


@functools.cache
def _run_scans() -> tuple[dict[str, dict[str, Any]], tuple[str, ...]]:
    """Render the variants and scan them all at once, once per session (failures included)."""
    uvx = _checkov_command()
    not_installed = _install(uvx)
    if not_installed is not None:
        return {}, (not_installed,)
    command = [
        *uvx,
        "--offline",
        "--from",
        f"checkov=={CHECKOV_VERSION}",
        "checkov",
        "--framework",
        "kubernetes",
        "--skip-download",
        "--config-file",
        str(CONFIG),
        "--output",
        "json",
    ]
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE"}
    with tempfile.TemporaryDirectory(prefix="courier-checkov-") as tmp:
        root = Path(tmp)
        for variant in VARIANTS:
            _write_render(variant, root / variant)
        # cwd is the temp dir: no stray .checkov.yaml of the checkout is picked up.
        procs = {
            variant: subprocess.Popen(
                [*command, "--directory", variant],
                cwd=root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for variant in VARIANTS
        }
        reports: dict[str, dict[str, Any]] = {}
        problems: list[str] = []
        for variant, proc in procs.items():
            try:
                stdout, stderr = proc.communicate(timeout=TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                stdout, stderr = proc.communicate()
                problems.append(f"{variant}: checkov took more than {TIMEOUT_SECONDS} s")
                continue
            try:
                report = json.loads(stdout)
            except json.JSONDecodeError:
                problems.append(
                    f"{variant}: checkov {CHECKOV_VERSION} did not report (exit "
                    f"{proc.returncode})\n--- stderr (tail) ---\n{stderr[-3000:]}\n"
                    f"--- stdout (head) ---\n{stdout[:1000]}"
                )
                continue
            if not isinstance(report, dict) or report.get("check_type") != "kubernetes":
                problems.append(f"{variant}: unexpected checkov report: {stdout[:1000]}")
                continue
            report["returncode"] = proc.returncode
            reports[variant] = report
    return reports, tuple(problems)


def _failures(report: dict[str, Any]) -> list[str]:
    return [
        f"{c['check_id']} {c['check_name']!r}: {c['resource']} ({c['file_path']})"
        for c in report["results"]["failed_checks"]
    ]


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_checkov_reports_no_failed_check(variant: str) -> None:
    report = _scans()[variant]
    summary = report["summary"]
    assert summary["checkov_version"] == CHECKOV_VERSION
    assert summary["parsing_errors"] == 0, report["results"]["parsing_errors"]
    assert summary["resource_count"] > 0
    assert summary["failed"] == 0, "\n".join(_failures(report))
    assert report["returncode"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_important_checks_passed_on_every_workload(variant: str) -> None:
    passed: dict[str, set[str]] = {}
    for check in _scans()[variant]["results"]["passed_checks"]:
        passed.setdefault(check["resource"], set()).add(check["check_id"])
    for workload in WORKLOADS:
        resource = f"Deployment.courier.courier-{workload}"
        missing = {
            check_id: what
            for check_id, what in IMPORTANT_CHECKS.items()
            if check_id not in passed.get(resource, set())
        }
        assert not missing, f"{resource}: these checks did not pass (or did not run): {missing}"
    pods = [f"Pod.courier.courier-{workload}." for workload in WORKLOADS]
    pods.append("Pod.courier.courier-test-readyz")
    for check_id, what in IMPORTANT_POD_CHECKS.items():
        for pod in pods:
            assert any(r.startswith(pod) and check_id in ids for r, ids in passed.items()), (
                f"{pod}*: {check_id} ({what}) did not pass (or did not run)"
            )


@pytest.mark.slow
@pytest.mark.parametrize("variant", VARIANTS)
def test_only_the_documented_resources_skip_checks(variant: str) -> None:
    skipped = _scans()[variant]["results"]["skipped_checks"]
    assert {(c["check_id"], c["resource"]) for c in skipped} == ANNOTATION_SKIPS
    for check in skipped:
        comment = check["check_result"].get("suppress_comment", "")
        assert comment not in ("", "No comment provided"), check


def test_every_skip_in_the_config_has_a_reason() -> None:
    config = load_yaml_file(CONFIG)
    # Only skips: nothing that could turn failures into a pass (soft-fail, check filters, ...).
    assert set(config) == {"skip-check"}, set(config)
    skips = config["skip-check"]
    assert skips, "an empty skip-check list: remove the key instead"
    lines = CONFIG.read_text().splitlines()
    entry = re.compile(r"^\s*-\s*([A-Z0-9_]+)\s*(?:#.*)?$")
    seen: list[str] = []
    for number, line in enumerate(lines):
        match = entry.match(line)
        if match is None:
            continue
        check_id = match.group(1)
        seen.append(check_id)
        reason: list[str] = []
        for previous in reversed(lines[:number]):
            if not previous.strip().startswith("#"):
                break
            reason.insert(0, previous.strip().lstrip("#").strip())
        text = " ".join(reason)
        assert text.startswith(check_id), (
            f"checkov.yaml:{number + 1}: the comment above {check_id} must start with its id"
        )
        assert len(text.split()) >= 12, f"checkov.yaml:{number + 1}: {check_id} needs a reason"
    assert seen == skips, "every skip-check entry on its own `- ID` line"
