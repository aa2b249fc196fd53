"""Checks what can be checked of docker/ without a Docker engine: the compose file parses
(anchors and merges included), every job process agrees with the hostfile, and the paths
the Dockerfile copies exist. Run by scripts/test.sh."""
import pathlib
import sys

import yaml

here = pathlib.Path(__file__).resolve().parent
compose = yaml.safe_load((here / "compose.yaml").read_text())
services = compose["services"]
hosts = [l.split("#")[0].strip() for l in (here / "hostfile").read_text().splitlines()]
hosts = [h for h in hosts if h]
jobs = {name: s for name, s in services.items() if s.get("command") == ["run"]}
problems = []
ids = sorted(int(s["environment"]["FLEETFLOW_PROCESS_ID"]) for s in jobs.values())
if ids != list(range(len(hosts))):
    problems.append(f"job process ids {ids} do not match the {len(hosts)} hostfile lines")
for name, s in jobs.items():
    env = s["environment"]
    if int(env["FLEETFLOW_PROCESSES"]) != len(hosts):
        problems.append(f"{name}: FLEETFLOW_PROCESSES={env['FLEETFLOW_PROCESSES']} but the hostfile has {len(hosts)} lines")
    host = hosts[int(env["FLEETFLOW_PROCESS_ID"])].rsplit(":", 1)[0]
    if s.get("hostname") != host:
        problems.append(f"{name}: hostname {s.get('hostname')} is not {host} from the hostfile")
    for key in ("FLEETFLOW_BROKERS", "FLEETFLOW_DATABASE_URL"):
        if key not in env:
            problems.append(f"{name}: {key} missing (the job merge lost the shared environment)")
for line in (here / "Dockerfile").read_text().splitlines():
    if line.startswith("COPY ") and "--from" not in line:
        for path in line.split()[1:-1]:
            if not (here.parent / path).exists():
                problems.append(f"Dockerfile copies {path}, which does not exist")
for p in problems:
    print("docker/check.py:", p, file=sys.stderr)
print(f"docker/: compose parses, {len(services)} services, {len(jobs)} job processes agree with the hostfile")
sys.exit(1 if problems else 0)
