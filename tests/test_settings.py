"""The server's settings (server/config.py): every flag, environment variable and YAML key, their
precedence, and one line naming the setting, with exit code 2, for every value the server
cannot use; ``lossd health`` reads the same settings without importing torch."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import fields

import pytest
import torch

from lossd.server import probe
from lossd.server.config import ServerConfig, SettingError

FIELDS = fields(ServerConfig)
# A valid, non-default value of each setting whose form is a pattern.
PATTERNED = {"device": "cpu", "audit_capture": "sample:7"}


def _text(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _flags(*argv: str, env: dict[str, str] | None = None, file=None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    return ServerConfig.from_sources(parser.parse_args(argv), env=env or {}, file=file)


def _lossd(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOSSD_")}
    return subprocess.run(
        [sys.executable, "-m", "lossd.server.cli", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        env={**clean, **(env or {})},
    )


def _other_value(f) -> object:
    """A valid value of setting ``f`` that is not its default."""
    rules = f.metadata
    if f.type == "bool":
        return not f.default
    if rules["choices"]:
        return next(c for c in rules["choices"] if c != f.default)
    if rules["pattern"]:  # a value of the form the pattern declares, not the default
        return PATTERNED[f.name]
    if f.type in ("int", "float"):
        hi = rules["max"]
        return (f.default - 1 if hi is not None and f.default >= hi else f.default + 1) * (
            1.0 if f.type == "float" else 1
        )
    return f"/srv/{f.name}"


# --------------------------------------------------------------------------- every source works


@pytest.mark.parametrize("f", FIELDS, ids=lambda f: f.name)
def test_every_setting_is_read_from_its_flag_its_variable_and_its_yaml_key(f, tmp_path):
    want = _other_value(f)
    flag = "--" + f.name.replace("_", "-")
    by_flag = (
        _flags(flag if want else "--no-" + flag[2:])
        if f.type == "bool"
        else _flags(flag, _text(want))
    )
    by_env = _flags(env={f"LOSSD_{f.name.upper()}": _text(want)})
    dashed, underscored = tmp_path / "dashed.yaml", tmp_path / "underscored.yaml"
    dashed.write_text(f"{f.name.replace('_', '-')}: {_text(want)!r}\n")
    underscored.write_text(f"{f.name}: {_text(want)}\n")
    for config in (by_flag, by_env, _flags(file=dashed), _flags(file=underscored)):
        assert getattr(config, f.name) == want
        assert type(getattr(config, f.name)) is type(f.default)
    assert getattr(_flags(), f.name) == f.default


def test_flags_win_over_the_environment_which_wins_over_the_file(tmp_path):
    path = tmp_path / "lossd.yaml"
    path.write_text("port: 1111\nworkers: 2\nlog_level: DEBUG\n")
    env = {"LOSSD_CONFIG": str(path), "LOSSD_PORT": "2222", "LOSSD_WORKERS": "3"}
    config = _flags("--port", "3333", env=env)
    assert (config.port, config.workers, config.log_level) == (3333, 3, "DEBUG")
    assert _flags("--config", str(path), env={}).port == 1111


def test_settings_built_in_code_are_checked_and_numbers_take_their_type():
    assert ServerConfig(grace_seconds=3).grace_seconds == 3.0
    assert isinstance(ServerConfig(grace_seconds=3).grace_seconds, float)
    with pytest.raises(
        SettingError,
        match=r"^--port: expected -1\.\.65535 \(-1: no TCP port, only --unix\), got -5$",
    ):
        ServerConfig(port=-5)
    with pytest.raises(SettingError, match=r"^--workers: expected >= 1, got 0$"):
        ServerConfig().replace(workers=0)
    with pytest.raises(SettingError, match=r"^--max-rank: expected an integer, got True$"):
        ServerConfig(max_rank=True)


# --------------------------------------------------------------------------- one line, exit 2


@pytest.mark.parametrize(
    ("argv", "env", "yaml", "line"),
    [
        (["--audit", "bogus"], {}, None, "--audit: expected one of none, runs, all, got 'bogus'"),
        ([], {"LOSSD_PORT": "abc"}, None, "LOSSD_PORT: expected an integer, got 'abc'"),
        ([], {"LOSSD_REFLECTION": "maybe"}, None, "LOSSD_REFLECTION: expected true or false"),
        (
            ["--port", "70000"],
            {},
            None,
            "--port: expected -1..65535 (-1: no TCP port, only --unix), got 70000",
        ),
        (["--grace-seconds", "soon"], {}, None, "--grace-seconds: expected a number, got 'soon'"),
        (["--device", "gpu"], {}, None, "--device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
        ([], {}, "prot: 50052\n", "unknown setting 'prot' (did you mean 'port'?)"),
        ([], {}, "workers: [4]\n", "workers: expected an integer, got [4]"),
        ([], {}, "- port\n", "expected a mapping of settings, got list"),
        ([], {}, "port: [\n", "not valid YAML"),
        (["--config", "/nonexistent/lossd.yaml"], {}, None, "--config /nonexistent/lossd.yaml: "),
        ([], {"LOSSD_CONFIG": "/nonexistent/x.yaml"}, None, "LOSSD_CONFIG /nonexistent/x.yaml: "),
        (
            ["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"],
            {},
            None,
            "/nonexistent/cert.pem",
        ),
    ],
    ids=[
        "bad-choice",
        "bad-env-integer",
        "bad-env-bool",
        "out-of-bounds",
        "bad-float",
        "bad-device",
        "unknown-yaml-key",
        "yaml-wrong-type",
        "yaml-not-a-mapping",
        "yaml-malformed",
        "missing-config-file",
        "missing-config-file-env",
        "missing-certificate",
    ],
)
def test_a_bad_setting_exits_2_with_one_line_naming_it(argv, env, yaml, line, tmp_path):
    if yaml is not None:
        path = tmp_path / "lossd.yaml"
        path.write_text(yaml)
        argv = ["--config", str(path), *argv]
    out = _lossd("serve", "--port", "0", *argv, env=env)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lossd serve: ") and line in lines[0], lines


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda_exits_2_naming_it():
    out = _lossd("serve", "--port", "0", "--device", "cuda")
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1, out.stderr[-2000:]
    assert lines[0].startswith("lossd serve: --device cuda: ") and "no CUDA device" in lines[0]


# --------------------------------------------------------------------------- lossd health


def test_health_reads_the_servers_port_and_certificate_from_the_same_settings(tmp_path):
    path = tmp_path / "lossd.yaml"
    path.write_text("port: 50999\ntls-cert: /etc/lossd/cert.pem\n")
    args = probe.parser({"LOSSD_CONFIG": str(path)}).parse_args([])
    assert args.endpoint == "127.0.0.1:50999" and args.tls_ca == "/etc/lossd/cert.pem"
    assert probe.parser({"LOSSD_PORT": "50998"}).parse_args([]).endpoint == "127.0.0.1:50998"


def test_health_refuses_a_bad_setting_with_one_line_and_exit_2(capsys):
    assert probe.main([], env={"LOSSD_PORT": "abc"}) == 2
    assert capsys.readouterr().err == "lossd health: LOSSD_PORT: expected an integer, got 'abc'\n"


def test_health_never_imports_torch(tmp_path):
    path = tmp_path / "lossd.yaml"
    path.write_text("port: 1\n")  # nothing listens there: the probe fails fast, exit 1
    script = (
        "import sys\n"
        "from lossd.server.cli import main\n"
        "code = main(['health', '--timeout', '0.5'])\n"
        "assert 'torch' not in sys.modules, 'lossd health imported torch'\n"
        "sys.exit(code)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "LOSSD_CONFIG": str(path)},
    )
    assert out.returncode == 1, out.stderr
    assert "127.0.0.1:1" in out.stderr and "imported torch" not in out.stderr


def test_serve_help_shows_every_setting_with_its_text_as_written():
    """argparse %-formats help strings: a setting whose help says "40 %" broke ``--help``."""
    parser = argparse.ArgumentParser(prog="lossd serve")
    ServerConfig.add_arguments(parser)
    shown = "".join(parser.format_help().split())  # argparse wraps lines, hyphens included
    for f in fields(ServerConfig):
        assert f"--{f.name.replace('_', '-')}" in shown
        assert "".join(f.metadata["help"].split()) in shown, f.name
    assert any("%" in f.metadata["help"] for f in fields(ServerConfig))  # the case is covered
