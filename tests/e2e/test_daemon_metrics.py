"""/metrics: valid for `promtool check metrics`, scraped by a real Prometheus
server (Debian's `prometheus`), which then answers a query for a skill's
violations."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
import urllib.parse
import urllib.request

import pytest

from conftest import require
from sgdaemon import free_port, manifest_text, read_all, running_daemon, wait_for

PROBE = "import socket\ntry:\n    socket.socket(socket.AF_INET)\nexcept OSError as e:\n    print(e.strerror)\n"


@pytest.fixture(scope="module")
def daemon():
    require(os.geteuid() == 0, "needs root (euid 0)")
    with running_daemon() as d:
        yield d


def _violate(daemon, name: str) -> None:
    reply, out = daemon.launch(manifest_text(name, str(daemon.work)), ["/usr/bin/python3", "-c", PROBE])
    assert daemon.call("wait", {"id": reply["id"]})["exit_code"] == 0
    assert read_all(out).strip() == "Operation not permitted"


def test_promtool_check_metrics(daemon):
    require(shutil.which("promtool") is not None, "promtool (Debian prometheus) not installed")
    _violate(daemon, "prom-lint")
    text = daemon.metrics_text()
    for name in ("skillguard_violations_total", "skillguard_skills_registered", "skillguard_skills_running",
                 "skillguard_attach_duration_seconds_bucket", "skillguard_launch_duration_seconds_bucket",
                 "skillguard_events_lost_total", "skillguard_events_suppressed_total",
                 "skillguard_policy_compile_errors_total", "skillguard_build_info",
                 "skillguard_api_unauthorized_requests_total"):
        assert f"\n{name}" in text or f"# TYPE {name.rsplit('_bucket', 1)[0]}" in text, name
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == "", proc.stdout + proc.stderr


def test_metrics_http_edges(daemon):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)
    conn.request("GET", "/nope")
    assert conn.getresponse().status == 404
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)
    conn.request("POST", "/metrics", body=b"x")
    assert conn.getresponse().status == 405
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=5)
    conn.request("GET", "/metrics")
    reply = conn.getresponse()
    assert reply.status == 200 and reply.getheader("Content-Type").startswith("text/plain")


def test_a_real_prometheus_scrapes_the_daemon(daemon, tmp_path):
    binary = shutil.which("prometheus")
    require(binary is not None, "prometheus (Debian package) not installed")
    _violate(daemon, "prom-scraped")
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(textwrap.dedent(f"""\
        global:
          scrape_interval: 1s
          evaluation_interval: 1s
        scrape_configs:
          - job_name: skillguard
            static_configs:
              - targets: ["127.0.0.1:{daemon.port}"]
        """))
    log = open(tmp_path / "prometheus.log", "wb")
    server = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'data'}",
                               f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                              stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    try:
        query = urllib.parse.urlencode({"query": 'skillguard_violations_total{skill="prom-scraped"}'})

        def scraped():
            if server.poll() is not None:
                raise AssertionError(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=5) as r:
                    answer = json.loads(r.read())
            except OSError:
                return None
            return answer["data"]["result"] or None

        result = wait_for(scraped, 60, 0.5, "Prometheus to scrape a skillguard violation")
        sample = result[0]
        assert sample["metric"]["job"] == "skillguard"
        assert sample["metric"]["layer"] == "seccomp" and sample["metric"]["decision"] == "denied"
        assert float(sample["value"][1]) >= 1
        # And the target is healthy.
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/targets", timeout=5) as r:
            targets = json.loads(r.read())["data"]["activeTargets"]
        assert [t["health"] for t in targets] == ["up"]
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
