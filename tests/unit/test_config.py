"""Host config: embedded defaults, file overrides, every bad field named with file:line."""
import pytest

from agent.config import ConfigError, HostConfig, load_host_config, parse_host_config, split_host_port


def test_defaults_without_a_file(tmp_path, monkeypatch):
    monkeypatch.delenv("SKILLGUARD_CONFIG", raising=False)
    import agent.config as config

    monkeypatch.setattr(config, "DEFAULT_PATH", str(tmp_path / "absent.yaml"))
    cfg = load_host_config()
    assert cfg == HostConfig()
    assert cfg.socket_path == "/run/skillguard/agent.sock" and cfg.metrics_address == "127.0.0.1:9464"


def test_explicit_missing_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_host_config(str(tmp_path / "absent.yaml"))


def test_overrides(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text("socket_path: /tmp/x.sock\nsocket_mode: 0600\nmetrics_address: ''\n"
                    "policy_dir: /p\nuid_range: 300000-300100\naddress_pool: 10.9.0.0/24\n"
                    "dns_upstream: [192.0.2.53]\nlog_path: /var/log/sg.jsonl\nrequest_timeout_s: 2\n"
                    "max_clients: 8\nsubscriber_queue: 50\nevent_rate_limit: 10\n"
                    "metrics_skill_labels: 3\nidle_timeout_s: 0\n")
    cfg = load_host_config(str(path))
    assert cfg.socket_mode == 0o600 and cfg.metrics_address == "" and cfg.dns_upstream == ("192.0.2.53",)
    assert cfg.request_timeout_s == 2.0 and isinstance(cfg.request_timeout_s, float)
    assert (cfg.max_clients, cfg.subscriber_queue, cfg.event_rate_limit, cfg.metrics_skill_labels) == (8, 50, 10, 3)
    assert cfg.source == str(path)


@pytest.mark.parametrize("text,message", [
    ("socket_path: relative.sock\n", "1:1: socket_path: must be an absolute path"),
    ("socket_path: /" + "x" * 120 + "\n", "at most 107 bytes"),
    ("metrics_address: nohost\n", "metrics_address: must be HOST:PORT"),
    ("metrics_address: example.com:80\n", "must be an IP address"),
    ("max_clients: 0\n", "max_clients: must be an integer from 1"),
    ("max_clients: true\n", "max_clients: must be an integer"),
    ("request_timeout_s: fast\n", "request_timeout_s: must be a number of seconds"),
    ("socket_mode: 999\n", "socket_mode: must be an octal mode"),
    ("nope: 1\n", "nope: unknown field"),
    ("uid_range: 5\n", "uid_range: must be FIRST-LAST"),
    ("a: [\n", "invalid YAML"),
])
def test_bad_fields(text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        parse_host_config(text, "agent.yaml")


def test_all_errors_at_once():
    with pytest.raises(ConfigError) as info:
        parse_host_config("max_clients: 0\nsocket_path: x\n", "f.yaml")
    assert "f.yaml:1:1" in str(info.value) and "f.yaml:2:1" in str(info.value)


def test_split_host_port():
    assert split_host_port("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert split_host_port("[::1]:1") == ("::1", 1)
    assert split_host_port("localhost:80") == ("localhost", 80)
    for bad in ("1.2.3.4", ":80", "1.2.3.4:0", "1.2.3.4:70000"):
        with pytest.raises(ValueError):
            split_host_port(bad)
