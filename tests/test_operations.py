"""Operations: what the metrics endpoint, the Grafana dashboard, the alert rules,
the systemd unit, the logs and `oms check-config` promise an operator.

The metric tests scrape a real daemon; promtool checks the scrape, the alert
rules (with unit tests of the rules) and the dashboard's PromQL. Tools that are
missing skip on a developer's machine and fail under CI=true (.ci/run installs
promtool), except systemd-analyze, which is checked where available.
"""
from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from oms_pipeline import config, logs
from oms_pipeline.generator import generate
from tests.conftest import IN_CI
from tests.support.daemon import ROOT, Daemon, write_config

pytestmark = pytest.mark.slow

DASHBOARD = ROOT / "deploy" / "grafana" / "oms-pipeline.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
UNIT = ROOT / "deploy" / "oms-pipeline.service"
README = ROOT / "README.md"

# Orders that need no payment and pass audit: they run the whole path by themselves.
PLAIN = {"kind": "tob", "source": "sales_plan", "payment_method": "none", "remark": "",
         "delivery_promise": "standard"}
# Metrics the dashboard and the rules may use before the daemon exposes them.
NOT_YET_EXPOSED: set[str] = set()


def require_tool(name: str) -> str:
    """The tool's path; skip when missing on a developer's machine, fail in CI."""
    path = shutil.which(name)
    if path:
        return path
    message = f"{name} is not installed"
    if IN_CI:
        pytest.fail(message + " (CI=true: .ci/run installs it; a missing tool is a failure)")
    pytest.skip(message)


def plain_orders(n: int, seed: int) -> list[dict]:
    return [{**r, **PLAIN} for r in generate(n, seed)]


def http(method: str, url: str, body: dict | None = None, headers: dict | None = None):
    """(status, headers, decoded body) of one request."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.headers, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read().decode(errors="replace")


def wait_all_ended(d: Daemon, n: int, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        orders = d.get("/stats")[1]["orders"]
        if not any(orders.get(s) for s in ("queued", "parked", "wait_pay")) and sum(orders.values()) >= n:
            return orders
        time.sleep(0.1)
    raise AssertionError(f"orders did not end: {d.get('/stats')[1]['orders']}")


# -- the metrics scrape -------------------------------------------------------

def families(text: str) -> dict[str, str]:
    """Metric family name -> type, from the exposition's # TYPE lines."""
    return {m.group(1): m.group(2) for m in re.finditer(r"^# TYPE (\S+) (\S+)$", text, re.M)}


def sample_names(text: str) -> set[str]:
    return {m.group(1) for m in re.finditer(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, re.M)}


def base_name(name: str) -> str:
    """The README's spelling of a family: counters keep `_total`, so compare without it."""
    return name[: -len("_total")] if name.endswith("_total") else name


@pytest.fixture(scope="module")
def scrape(tmp_path_factory) -> str:
    """/metrics of a daemon that has run orders to their ends (every family has samples)."""
    tmp = tmp_path_factory.mktemp("scrape")
    cfg, port = write_config(tmp, metrics=True)
    metrics_port = int(re.search(r"\[metrics\]\nport = (\d+)", cfg.read_text()).group(1))
    # A short watchdog interval makes the daemon refresh oms_orders every second, not every 10 s.
    d = Daemon(cfg, port, env={"WATCHDOG_USEC": "1000000"}).start()
    try:
        orders = plain_orders(6, seed=11)
        for order in orders:
            assert d.post("/orders", order)[0] == 201
        wait_all_ended(d, len(orders))
        deadline = time.monotonic() + 15
        while True:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
                text = resp.read().decode()
            if re.search(r'^oms_orders\{state="done"\} [1-9]', text, re.M) or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        d.stop()
    assert re.search(r'^oms_orders\{state="done"\} [1-9]', text, re.M), text[-3000:]
    return text


def test_promtool_check_metrics_passes_on_a_real_scrape(scrape):
    """The exposition is valid and lint-clean by Prometheus' own rules (names, help, types, units)."""
    promtool = require_tool("promtool")
    done = subprocess.run([promtool, "check", "metrics"], input=scrape, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), done.stdout + done.stderr
    assert "oms_stage_handler_seconds_bucket{" in scrape and 'outcome="next"' in scrape


def readme_metrics() -> set[str]:
    text = README.read_text()
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    names = set(re.findall(r"^\| `(oms_[a-z0-9_]+)` \|", section, re.M))
    assert len(names) >= 10, section
    return names


def test_every_exposed_oms_metric_is_documented_and_every_documented_one_exposed(scrape):
    exposed = {base_name(f) for f in families(scrape) if f.startswith("oms_")}
    documented = {base_name(n) for n in readme_metrics()}
    assert exposed - documented == set(), "exposed but not in README.md's Metrics table"
    assert documented - exposed == set(), "in README.md's Metrics table but not exposed"
    # The README's type column matches the exposition.
    types = {base_name(f): t for f, t in families(scrape).items()}
    section = README.read_text().split("\n## Metrics\n", 1)[1]
    for name, kind in re.findall(r"^\| `(oms_[a-z0-9_]+)` \| (\w+) \|", section, re.M):
        assert types[base_name(name)] == kind, name


# -- PromQL in the dashboard and the rules ------------------------------------

FUNCTIONS = {"sum", "min", "max", "avg", "count", "rate", "irate", "increase", "delta", "histogram_quantile",
             "absent", "changes", "topk", "bottomk", "clamp_min", "clamp_max", "label_values", "vector", "scalar"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}


def promql_metrics(expr: str) -> set[str]:
    """Metric names an expression selects (strings, matchers, ranges, groupings and variables removed)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    e = re.sub(r"\$\{?\w+\}?", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][A-Za-z0-9_:]*", e):
        word = m.group()
        if e[m.end():].lstrip().startswith("("):
            assert word in FUNCTIONS, f"unexpected function {word} in {expr}"
        elif word not in KEYWORDS:
            names.add(word)
    return names


def known_names(scrape: str) -> set[str]:
    return sample_names(scrape) | set(families(scrape)) | NOT_YET_EXPOSED


def dashboard_exprs() -> list[tuple[str, str]]:
    """(where, expr) of every panel target of the dashboard."""
    dash = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"]))
    return out


def test_the_dashboard_is_a_grafana_dashboard_with_the_operators_panels():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["schemaVersion"] >= 36 and dash["uid"] and dash["title"]
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource" and variables["DS_PROMETHEUS"]["query"] == "prometheus"
    stage = variables["stage"]
    assert stage["type"] == "query" and "label_values(oms_stage_queue_depth, stage)" in json.dumps(stage["query"])
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dash["panels"]:
        assert {"h", "w", "x", "y"} <= set(panel["gridPos"])
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}" and panel["targets"], panel["title"]
        assert all(t["datasource"]["uid"] == "${DS_PROMETHEUS}" for t in panel["targets"])
    exprs = " ".join(e for _, e in dashboard_exprs())
    for wanted in ("oms_stage_queue_depth", "sum by (stage) (rate(oms_stage_processed_total",
                   "sum by (outcome) (rate(oms_stage_processed_total", "oms_stage_handler_seconds_bucket",
                   "oms_order_e2e_seconds_bucket", "oms_stage_busy_slots", "oms_stage_pool_size",
                   "oms_stage_in_flight", "oms_stage_producers_waiting", "oms_orders{", 'state="parked"',
                   'state="manual"', 'outcome="manual"', "oms_timers_pending", "oms_dead_letters_total",
                   "process_cpu_seconds_total", "process_resident_memory_bytes"):
        assert wanted in exprs, wanted
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (stage, le) (rate(oms_stage_handler_seconds_bucket" in exprs
        assert f"histogram_quantile({q}, sum by (le) (rate(oms_order_e2e_seconds_bucket" in exprs
    dead = next(p for p in dash["panels"] if "oms_dead_letters_total" in json.dumps(p.get("targets", [])))
    assert "RabbitMQ" in dead["description"] and "x-oms-reason" in dead["description"]
    assert "sum by (queue, result) (rate(oms_intake_messages_total" in exprs


def test_dashboard_and_alert_expressions_use_only_exposed_metrics(scrape):
    known = known_names(scrape)
    exprs = dashboard_exprs()
    dash = json.loads(DASHBOARD.read_text())
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            metric = re.fullmatch(r"label_values\((\w+), *\w+\)", var["definition"]).group(1)
            exprs.append((f"variable {var['name']}", metric))
    exprs += [(f"alert {name}", expr) for name, expr in alert_exprs()]
    for where, expr in exprs:
        names = promql_metrics(expr)
        assert names, f"{where}: no metric in {expr}"
        unknown = names - known - ({"up"} if where.startswith("alert") else set())
        assert not unknown, f"{where}: {sorted(unknown)} not exposed by the daemon: {expr}"


def alert_exprs() -> list[tuple[str, str]]:
    text = ALERTS.read_text()
    # The file is simple YAML; find `alert:` names and their `expr:` (inline or a `|` block).
    out = []
    for m in re.finditer(r"- alert: (\w+)\n(?:\s+#.*\n)*\s+expr: (\|\n((?:\s{10,}.*\n)+)|.*\n)", text):
        expr = m.group(3) if m.group(3) else m.group(2)
        out.append((m.group(1), textwrap.dedent(expr).strip()))
    assert len(out) == text.count("- alert:") and out
    return out


def test_dashboard_promql_parses(tmp_path):
    """promtool parses every dashboard expression (as recording rules, Grafana variables filled in)."""
    promtool = require_tool("promtool")
    rules = ["groups:", "  - name: dashboard", "    rules:"]
    for i, (_, expr) in enumerate(dashboard_exprs()):
        concrete = expr.replace("$__rate_interval", "5m").replace("$instance", ".*").replace("$stage", ".*")
        rules += [f"      - record: dashboard:expr_{i}", f"        expr: {json.dumps(concrete)}"]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text("\n".join(rules) + "\n")
    done = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_promtool_check_rules_passes_on_the_alert_rules():
    promtool = require_tool("promtool")
    done = subprocess.run([promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
    names = {name for name, _ in alert_exprs()}
    assert {"OmsPipelineDown", "OmsOrdersStuck", "OmsStageSaturated", "OmsBackpressure", "OmsExceptionCentreGrowing",
            "OmsDeadLetters", "OmsHandlerLatencyHigh"} <= names
    for block in ALERTS.read_text().split("- alert: ")[1:]:
        assert "summary:" in block and "description:" in block and "runbook:" in block, block[:60]


RULE_TESTS = """
rule_files: [{alerts}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{{job="oms-pipeline", instance="a"}}'
        values: '1 1 0x20'
      - series: 'oms_orders{{job="oms-pipeline", instance="a", state="queued"}}'
        values: '5x40'
      - series: 'oms_orders_in_flight{{job="oms-pipeline", instance="a"}}'
        values: '2x40'
      - series: 'oms_orders_finished_total{{job="oms-pipeline", instance="a", end="@done"}}'
        values: '100x40'
      - series: 'oms_orders{{job="oms-pipeline", instance="b", state="queued"}}'
        values: '5x40'
      - series: 'oms_orders_finished_total{{job="oms-pipeline", instance="b", end="@done"}}'
        values: '100+10x40'
      - series: 'oms_stage_busy_slots{{job="oms-pipeline", instance="a", stage="waybill"}}'
        values: '32x20'
      - series: 'oms_stage_pool_size{{job="oms-pipeline", instance="a", stage="waybill"}}'
        values: '32x20'
      - series: 'oms_stage_busy_slots{{job="oms-pipeline", instance="a", stage="audit"}}'
        values: '10x20'
      - series: 'oms_stage_pool_size{{job="oms-pipeline", instance="a", stage="audit"}}'
        values: '32x20'
      - series: 'oms_dead_letters_total{{job="oms-pipeline", instance="a"}}'
        values: '0 0 0 3 3 3'
    alert_rule_test:
      - alertname: OmsPipelineDown
        eval_time: 5m
        exp_alerts:
          - exp_labels: {{severity: critical, job: oms-pipeline, instance: a}}
      - alertname: OmsPipelineDown
        eval_time: 1m
        exp_alerts: []
      - alertname: OmsOrdersStuck
        eval_time: 15m
        exp_alerts:
          - exp_labels: {{severity: critical, instance: a}}
      - alertname: OmsStageSaturated
        eval_time: 15m
        exp_alerts:
          - exp_labels: {{severity: warning, instance: a, stage: waybill}}
      - alertname: OmsDeadLetters
        eval_time: 4m
        exp_alerts:
          - exp_labels: {{severity: critical, instance: a}}
      - alertname: OmsDeadLetters
        eval_time: 2m
        exp_alerts: []
"""


def without_annotations(rules: str) -> str:
    """The rules file less its `annotations:` blocks (promtool's rule tests compare annotations too)."""
    out, inside = [], None
    for line in rules.splitlines():
        indent = len(line) - len(line.lstrip())
        if inside is not None and (not line.strip() or indent > inside):
            continue
        inside = indent if line.strip() == "annotations:" else None
        if inside is None:
            out.append(line)
    return "\n".join(out) + "\n"


def test_the_alert_rules_fire_on_the_situations_they_are_for(tmp_path):
    """promtool's rule unit tests: down, stuck (not when orders finish), saturation, dead letters."""
    promtool = require_tool("promtool")
    rules = tmp_path / "alerts.yml"
    rules.write_text(without_annotations(ALERTS.read_text()))
    assert "annotations:" not in rules.read_text() and rules.read_text().count("- alert:") >= 7
    path = tmp_path / "alerts_test.yml"
    path.write_text(RULE_TESTS.format(alerts=json.dumps(str(rules))))
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- systemd unit ---------------------------------------------------------------

def unit_settings(text: str, section: str = "Service") -> dict[str, str]:
    out, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = line.strip("[]")
        elif current == section and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert m, value
    return float(m.group(1)) * (60 if m.group(2) in ("min", "m") else 1)


def test_the_unit_is_a_notify_service_with_watchdog_reload_and_enough_stop_time():
    service = unit_settings(UNIT.read_text())
    assert service["Type"] == "notify"
    assert seconds(service["WatchdogSec"]) > 0
    assert "-HUP" in service["ExecReload"] and "$MAINPID" in service["ExecReload"]
    assert service["KillMode"] == "mixed"
    grace = config.load(ROOT / "config" / "oms.toml", env={}).daemon.shutdown_grace
    assert seconds(service["TimeoutStopSec"]) > grace
    assert service["RestartPreventExitStatus"] == "2"  # a configuration error is not fixed by restarting


def test_systemd_analyze_verify_accepts_the_unit(tmp_path):
    analyze = shutil.which("systemd-analyze")
    if not analyze:
        pytest.skip("systemd-analyze is not installed (the unit is verified where it is)")
    (tmp_path / "work" / "var").mkdir(parents=True)
    text = UNIT.read_text()
    for old, new in (("/opt/oms-pipeline/.venv/bin/python", sys.executable),
                     ("/opt/oms-pipeline/run_pipeline.py", str(ROOT / "run_pipeline.py")),
                     ("/etc/oms-pipeline/oms.toml", str(ROOT / "config" / "oms.toml")),
                     ("/etc/oms-pipeline/env", str(tmp_path / "env")),
                     ("/opt/oms-pipeline/var", str(tmp_path / "work" / "var")),
                     ("WorkingDirectory=/opt/oms-pipeline", f"WorkingDirectory={tmp_path / 'work'}"),
                     ("file:///opt/oms-pipeline/README.md", f"file://{README}")):
        assert old in text, old
        text = text.replace(old, new)
    text = re.sub(r"^(User|Group)=.*\n", "", text, flags=re.M)  # the user `oms` does not exist here
    settings = "".join(line for line in text.splitlines(True) if not line.startswith("#"))
    assert "/opt/oms-pipeline" not in settings and "/etc/oms-pipeline" not in settings
    unit = tmp_path / "oms-pipeline.service"
    unit.write_text(text)
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    # verify exits 0 even on unknown keys or bad values ("... ignoring."): any output is a finding.
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 0 and output == "", output


# -- logs -----------------------------------------------------------------------

def format_record(log: logging.Logger, stream: io.StringIO) -> dict:
    line = stream.getvalue().strip().splitlines()[-1]
    return json.loads(line)


@pytest.fixture
def json_logger():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JsonFormatter())
    log = logging.getLogger("tests.operations.masking")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log, stream
    log.handlers[:] = []


def test_json_formatter_masks_names_phones_and_addresses(json_logger):
    log, stream = json_logger
    token = logs.request_id.set("rid-42")
    try:
        log.warning("customer 13812345678 asked about %s", "A-1", extra={
            "order_no": "123", "stage": "audit", "phone": "13812345678", "recipient": "张三丰",
            "address": "北京市朝阳区建国路88号", "note": "call 13812345678",
            "consignee": {"name": "张三丰", "phone": "13812345678", "detail": "建国路88号", "city": "北京市"},
            "lines": [{"sku": "SKU-1", "mobile": "13812345678"}]})
    finally:
        logs.request_id.reset(token)
    raw = stream.getvalue()
    for secret in ("13812345678", "张三丰", "建国路88号", "三丰"):
        assert secret not in raw
    rec = format_record(log, stream)
    assert rec["msg"] == "customer 138****5678 asked about A-1"
    assert (rec["level"], rec["order_no"], rec["stage"], rec["request_id"]) == ("warning", "123", "audit", "rid-42")
    assert rec["phone"] == "138****5678" and rec["recipient"] == "张**" and rec["address"] == "***"
    assert rec["note"] == "call 138****5678"
    assert rec["consignee"] == {"name": "张**", "phone": "138****5678", "detail": "***", "city": "北京市"}
    assert rec["lines"] == [{"sku": "SKU-1", "mobile": "138****5678"}]


def test_json_formatter_masks_phones_in_exception_text(json_logger):
    log, stream = json_logger
    try:
        raise ValueError("bad consignee phone 13812345678")
    except ValueError:
        log.exception("request failed", extra={"event": "http_error"})
    assert "ValueError" in format_record(log, stream)["error"]
    assert "13812345678" not in stream.getvalue()


REQUEST_ID = "ops-test-request-0001"


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> dict:
    """A daemon at log_level debug takes an order with personal data; returns answers and log lines."""
    tmp = tmp_path_factory.mktemp("logs")
    cfg, port = write_config(tmp)
    cfg.write_text(cfg.read_text().replace('log_level = "info"', 'log_level = "debug"'))
    d = Daemon(cfg, port).start()
    base = f"http://127.0.0.1:{port}"
    try:
        order = plain_orders(1, seed=5)[0]
        order["consignee"] = {**order["consignee"], "name": "张三丰", "phone": "13812345678", "detail": "建国路88号"}
        created = http("POST", base + "/orders", order, {"X-Request-Id": REQUEST_ID})
        assert created[0] == 201, created
        no_header = http("POST", base + "/orders", plain_orders(1, seed=6)[0])
        assert no_header[0] == 201, no_header
        wait_all_ended(d, 2)
        shown = http("GET", base + f"/orders/{created[2]['order_no']}")
    finally:
        d.stop()
    lines = [line for line in d.log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return {"created": created, "no_header": no_header, "shown": shown, "lines": lines, "raw": d.log_path.read_text()}


def test_daemon_logs_are_json_lines_without_personal_data(logged_run):
    records = []
    for line in logged_run["lines"]:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"not a JSON log line: {line!r}")
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    events = [r.get("event") for r in records]
    assert "start" in events and "ready" in events and "stopped" in events and "http" in events
    for secret in ("13812345678", "建国路88号", "张三丰"):
        assert secret not in logged_run["raw"]
    assert logged_run["shown"][0] == 200  # the order itself was stored


def test_every_answer_carries_a_request_id(logged_run):
    _, headers, _ = logged_run["created"]
    assert headers["X-Request-Id"] == REQUEST_ID  # taken from the request
    made_up = logged_run["no_header"][1]["X-Request-Id"]
    assert made_up and made_up != REQUEST_ID  # or made up


def test_log_lines_of_a_request_carry_its_request_id(logged_run):
    records = [json.loads(line) for line in logged_run["lines"]]
    ours = [r for r in records if r.get("event") == "http" and r.get("method") == "POST" and r.get("path") == "/orders"]
    assert len(ours) == 2
    assert REQUEST_ID in [r.get("request_id") for r in ours]
    assert all(r.get("request_id") for r in ours)


# -- oms order-no ---------------------------------------------------------------

def test_oms_order_no_reads_the_second_instance_and_sequence_behind_a_number(tmp_path):
    from oms_pipeline import config
    from oms_pipeline.order_no import InMemoryBlocks, OrderNumbers, luhn_digit
    key = "order-no-key-for-the-cli-test"
    cfg = tmp_path / "oms.toml"
    cfg.write_text(f'[daemon]\norder_no_key = "{key}"\n')
    assert config.load(cfg).daemon.order_no_key == key
    no = OrderNumbers(key.encode(), 7, InMemoryBlocks(4_321)).next(1_796_689_212.5)

    def oms_order_no(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "oms_pipeline.cli", "order-no", *args, "--config", str(cfg)],
                              capture_output=True, text=True, timeout=60, cwd=ROOT)

    done = oms_order_no(no + "-2", "--json")
    assert done.returncode == 0, done
    assert json.loads(done.stdout) == {"order_no": no + "-2", "issued_at": 1_796_689_212.0,
                                       "instance": 7, "sequence": 4_321}
    assert "issued 2026-12-08 00:20:12 UTC, instance 7, sequence 4321" in oms_order_no(no).stdout
    bad = oms_order_no(no[:-1] + str((int(no[-1]) + 1) % 10))
    assert bad.returncode == 2 and "is not an order number" in bad.stderr and "check digit" in bad.stderr
    no_date = "1" + "261307225012" + no[13:-1]  # month 13, with a correct check digit
    bad = oms_order_no(no_date + luhn_digit(no_date))
    assert bad.returncode == 2 and "is not an order number" in bad.stderr and "yyMMddHHmmss" in bad.stderr


# -- oms check-config -----------------------------------------------------------

ROUTES = ROOT / "config" / "routes.toml"


def check_config(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "oms_pipeline.cli", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)


def assert_refused(done: subprocess.CompletedProcess, *needles: str) -> None:
    assert done.returncode == 2, done
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert done.stdout == ""


def test_check_config_accepts_the_shipped_config():
    done = check_config(ROOT / "config" / "oms.toml")
    assert done.returncode == 0, done.stderr
    assert "ok" in done.stdout and done.stderr == ""


@pytest.mark.parametrize("body, needles", [
    ("[stages.fill]\npool = 0\n", ["key stages.fill.pool"]),
    ("[stages.nope]\npool = 3\n", ["stages.nope", "not a known stage"]),
    ("[metrics]\nport = 70000\n", ["metrics.port"]),
], ids=["bad-value", "unknown-stage-section", "bad-port"])
def test_check_config_refuses_a_bad_file_naming_the_key(tmp_path, body, needles):
    path = tmp_path / "oms.toml"
    path.write_text(f'[routing]\nfile = "{ROUTES}"\n' + body)
    assert_refused(check_config(path), str(path), *needles)


@pytest.mark.parametrize("edit, needles", [
    (lambda t: t.replace('skip = ["notify_paid", "voucher", "reissue_sms"]', 'skip = ["notify_paid", "ghost"]'),
     ["paths.tob.skip", "unknown stage 'ghost'"]),
    (lambda t: t + '\n[[rules]]\nstage = "audit"\noutcome = "manual"\nto = "teleport"\n',
     ["rule (*, *, audit, manual) -> teleport", "unknown target 'teleport'"]),
    (lambda t: t.replace('"audit",', '"audit", "nope",', 1), ["stages", "unknown stage 'nope'"]),
], ids=["path-skips-unknown-stage", "rule-to-unknown-target", "unknown-stage-in-order"])
def test_check_config_refuses_a_broken_routing_table_naming_the_route(tmp_path, edit, needles):
    routes = tmp_path / "routes.toml"
    original = ROUTES.read_text()
    broken = edit(original)
    assert broken != original
    routes.write_text(broken)
    path = tmp_path / "oms.toml"
    path.write_text('[routing]\nfile = "routes.toml"\n')
    assert_refused(check_config(path), str(routes), *needles)
