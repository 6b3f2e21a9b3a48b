"""`make run`: every Courier process on this machine, in the foreground, one log stream.

The processes are listed in ``Procfile`` (the Heroku/foreman convention) and run by honcho,
which prefixes each line with the process name and stops them all on Ctrl-C. Before that,
this script says where things are.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROCFILE = REPO / "Procfile"


def processes() -> list[str]:
    if not PROCFILE.exists():
        return []
    names = []
    for line in PROCFILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            names.append(line.split(":", 1)[0])
    return names


def main() -> int:
    names = processes()
    print("courier: RabbitMQ  amqp://guest:guest@127.0.0.1:5672/  (UI http://127.0.0.1:15672)")
    print("courier: Redis     redis://127.0.0.1:6379/0")
    if not names:
        print("courier: no services are defined in Procfile yet; nothing else to start.")
        return 0
    print(f"courier: starting {', '.join(names)} (Ctrl-C stops all of them)")
    (REPO / "var").mkdir(exist_ok=True)
    honcho = shutil.which("honcho")
    if honcho is None:
        print("courier: honcho is missing from the environment; run `make setup`", file=sys.stderr)
        return 1
    os.execv(honcho, [honcho, "start", "-f", str(PROCFILE), "-d", str(REPO)])
    return 0  # not reached


if __name__ == "__main__":
    raise SystemExit(main())
