"""Reading one sample out of a Prometheus text exposition (a service's ``/metrics``)."""

from __future__ import annotations


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the series *name* with exactly *labels*; 0 when it does not exist yet
    (a counter nobody has incremented is not exposed)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, rest = series.partition("{")
        if metric != name:
            continue
        found = ",".join(sorted(p for p in rest.rstrip("}").split(",") if p))
        if found == wanted:
            return float(value)
    return 0.0
