"""Checks what can be checked of docker/ without a Docker engine: the compose file parses
(anchors and merges included), every job process agrees with the hostfile, the paths the
Dockerfile copies exist, and the monitoring files (Prometheus scrape config and rules,
Grafana provisioning and dashboard) parse, agree with the compose file and with each other,
and use only metric names the README documents as exported (tests/pipeline_alerts.rs checks
those against a live job and gateway). promtool checks the rules themselves (scripts/test.sh).
Run by scripts/test.sh."""
import json
import pathlib
import re
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

# --- monitoring ------------------------------------------------------------------------------
# The same logic as tests/pipeline_alerts.rs: metric names are fleetflow_[a-z_]+ in PromQL, and
# the exported names are the backticked ones in the rows of the README's metric table (from its
# `| metric | meaning |` header to the first line that is not a row) and in the gateway's
# `| \`GET /metrics\`` row.
METRIC = re.compile(r"fleetflow_[a-z_]+")
readme = (here.parent / "README.md").read_text()
documented = set()
in_table = False
for line in readme.splitlines():
    in_table = (in_table and line.startswith("|")) or line == "| metric | meaning |"
    if in_table or line.startswith("| `GET /metrics`"):
        documented |= set(re.findall(r"`(fleetflow_[a-z_]+)", line))
if len(documented) < 20:
    problems.append(f"found only {sorted(documented)} in the README's metric tables")


def undocumented(names):
    """Names that are not documented, allowing a histogram's _bucket, _sum and _count."""
    return sorted(n for n in names if n not in documented and re.sub(r"_(bucket|sum|count)$", "", n) not in documented)


prom_dir = here / "prometheus"
prom = yaml.safe_load((prom_dir / "prometheus.yml").read_text())
scrape = {c["job_name"]: [t for s in c.get("static_configs", []) for t in s["targets"]] for c in prom["scrape_configs"]}
want = sorted(f"{s['hostname']}:{s['environment']['FLEETFLOW_METRICS_LISTEN'].rsplit(':', 1)[1]}" for s in jobs.values()
              if "FLEETFLOW_METRICS_LISTEN" in s["environment"])
if len(want) != len(jobs):
    problems.append("a job process in compose.yaml has no FLEETFLOW_METRICS_LISTEN: Prometheus cannot scrape it")
if sorted(scrape.get("fleetflow", [])) != want:
    problems.append(f"prometheus.yml scrapes job targets {scrape.get('fleetflow')}, compose runs {want}")
gw_listen = services["gateway"]["command"][services["gateway"]["command"].index("--listen") + 1]
if scrape.get("fleetflow-gateway") != [f"gateway:{gw_listen.rsplit(':', 1)[1]}"]:
    problems.append(f"prometheus.yml scrapes the gateway at {scrape.get('fleetflow-gateway')}, compose listens on {gw_listen}")
rules_used = set()
alerts = []
for rule_file in prom["rule_files"]:
    groups = yaml.safe_load((prom_dir / rule_file).read_text())["groups"]
    for group in groups:
        for rule in group["rules"]:
            alerts.append(rule["alert"])
            rules_used |= set(METRIC.findall(rule["expr"]))
            if "for" not in rule:
                problems.append(f"{rule_file}: {rule['alert']} has no for:")
            if rule.get("labels", {}).get("severity") not in ("critical", "warning"):
                problems.append(f"{rule_file}: {rule['alert']} has no severity critical or warning")
            notes = rule.get("annotations", {})
            for key in ("summary", "description", "runbook"):
                if not notes.get(key):
                    problems.append(f"{rule_file}: {rule['alert']} has no {key} annotation")
            if "README" not in notes.get("runbook", ""):
                problems.append(f"{rule_file}: {rule['alert']}'s runbook does not point to the README")
for name in undocumented(rules_used):
    problems.append(f"the rules use {name}, which the README does not list as exported")
# Every alert has a unit test in which it fires.
tests = yaml.safe_load((prom_dir / "fleetflow-rules.test.yml").read_text())
fired = {t["alertname"] for case in tests["tests"] for t in case.get("alert_rule_test", []) if t.get("exp_alerts")}
for alert in alerts:
    if alert not in fired:
        problems.append(f"fleetflow-rules.test.yml has no case where {alert} fires")
for key in ("prometheus", "grafana"):
    if key not in services:
        problems.append(f"compose.yaml has no {key} service")
for name in ("prometheus", "grafana"):
    for volume in services.get(name, {}).get("volumes", []):
        if not (here / volume.split(":")[0]).exists():
            problems.append(f"{name} mounts {volume}, whose source does not exist")

grafana = here / "grafana"
sources = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())["datasources"]
uids = {d["uid"] for d in sources}
yaml.safe_load((grafana / "provisioning/dashboards/fleetflow.yml").read_text())
dashboard_used = set()
dashboards = sorted((grafana / "dashboards").glob("*.json"))
if not dashboards:
    problems.append("docker/grafana/dashboards has no dashboard")
for path in dashboards:
    dashboard = json.loads(path.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            uid = target.get("datasource", panel.get("datasource", {})).get("uid")
            if uid not in uids:
                problems.append(f"{path.name}: panel {panel['title']!r} uses datasource {uid}, not provisioned")
            dashboard_used |= set(METRIC.findall(target.get("expr", "")))
for name in undocumented(dashboard_used):
    problems.append(f"the dashboard uses {name}, which the README does not list as exported")

for p in problems:
    print("docker/check.py:", p, file=sys.stderr)
print(f"docker/: compose parses, {len(services)} services, {len(jobs)} job processes agree with the hostfile; "
      f"{len(alerts)} alert rules and {len(dashboards)} dashboard use {len(rules_used | dashboard_used)} metric names")
sys.exit(1 if problems else 0)
