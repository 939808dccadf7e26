"""CLI: version, --help, --check, a foreground smoke run per Python, clean signal shutdown."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import ccproxy
from helpers import REPO, anthropic_provider

SCRIPT = str(REPO / "ccproxy.py")


def clean_env(home=None):
    """The environment for a ccproxy subprocess: no CCPROXY_ settings, its own HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CCPROXY_") and k != "LOG"}
    if home is not None:
        env["HOME"] = str(home)
    return env


def test_version_runs_isolated_on_the_standard_library_alone():
    result = subprocess.run([sys.executable, "-I", "-S", SCRIPT, "version"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.strip() == "ccproxy %s" % ccproxy.__version__


def test_version_matches_pyproject():
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^version = "([^"]+)"', text, re.M).group(1) == ccproxy.__version__


@pytest.mark.parametrize("command", ["start", "stop", "status", "code", "env", "version"])
def test_every_subcommand_has_help_naming_the_command_as_it_was_run(command):
    result = subprocess.run([sys.executable, SCRIPT, command, "--help"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python3 %s %s" % (SCRIPT, command))


def test_start_help_lists_its_flags_with_examples_one_per_line():
    out = subprocess.run([sys.executable, SCRIPT, "start", "--help"], capture_output=True,
                         text=True, timeout=30).stdout
    for flag in ("--foreground", "--check", "--probe", "--config", "--host", "--port"):
        assert flag in out
    assert "\n  python3 %s start --check --probe\n" % SCRIPT in out


def test_code_help_gives_its_examples_on_separate_lines():
    out = subprocess.run([sys.executable, SCRIPT, "code", "--help"], capture_output=True,
                         text=True, timeout=30).stdout
    examples = out.split("examples:\n", 1)[1].splitlines()
    assert examples == ["  python3 %s code" % SCRIPT, '  python3 %s code -p "fix the tests"' % SCRIPT,
                        "  python3 %s code -- --help" % SCRIPT]


def test_dash_dash_version_prints_the_version():
    result = subprocess.run([sys.executable, SCRIPT, "--version"], capture_output=True, text=True,
                            timeout=30)
    assert (result.returncode, result.stdout.strip()) == (0, "ccproxy %s" % ccproxy.__version__)


def test_python_dash_m_runs_it_and_its_help_says_so():
    result = subprocess.run([sys.executable, "-m", "ccproxy", "stop", "--help"], cwd=str(REPO),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python3 -m ccproxy stop")


def test_no_command_prints_help():
    result = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "start" in result.stdout


def pyenv_python(version_prefix=None):
    """A pyenv-installed python3 of that version (the newest one when None), or None."""
    root = shutil.which("pyenv") and subprocess.run(["pyenv", "root"], capture_output=True,
                                                    text=True).stdout.strip()
    if not root:
        return None
    versions = sorted((p for p in Path(root, "versions").glob("3.*") if
                       re.fullmatch(r"3\.\d+\.\d+", p.name)),
                      key=lambda p: tuple(int(n) for n in p.name.split(".")))
    if version_prefix:
        versions = [p for p in versions if p.name.startswith(version_prefix + ".")]
    return str(versions[-1] / "bin" / "python3") if versions else None


class ForegroundProxy:
    """`ccproxy.py start --foreground` in a subprocess, with its address read from its log."""

    def __init__(self, python, config_path, *extra):
        self.process = subprocess.Popen(
            [python, SCRIPT, "start", "--foreground", "--port", "0", "--config", str(config_path)]
            + list(extra), stderr=subprocess.PIPE, text=True,
            env=clean_env(Path(config_path).parent))
        self.lines = []
        for line in self.process.stderr:
            self.lines.append(line)
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                self.url = match.group(1)
                return
        raise AssertionError("no listening line: %s" % "".join(self.lines))

    def stop(self, signum=signal.SIGTERM):
        self.process.send_signal(signum)
        rest = self.process.communicate(timeout=15)[1]
        return self.process.returncode, "".join(self.lines) + rest


def post_message(url):
    body = json.dumps({"model": "m", "max_tokens": 5,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    request = urllib.request.Request(url + "/v1/messages", data=body,
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@pytest.mark.parametrize("which", ["3.8", "newest"])
def test_smoke_run_start_request_stop(which, tmp_path, upstream):
    python = pyenv_python(None if which == "newest" else which)
    if python is None:
        pytest.skip("pyenv has no Python %s on this machine" % which)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"providers": [anthropic_provider(upstream)]}))
    proxy = ForegroundProxy(python, config)
    assert post_message(proxy.url)["content"][0]["text"] == "Hello from upstream"
    code, log = proxy.stop()
    assert code == 0 and "ccproxy stopped" in log
    assert "sk-ant-upstream-secret" not in log


def test_foreground_start_writes_and_removes_its_pidfile(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("{}")
    proxy = ForegroundProxy(sys.executable, config)
    pidfile = tmp_path / ".ccproxy" / "ccproxy.pid"
    record = json.loads(pidfile.read_text())
    assert record["pid"] == proxy.process.pid and record["url"] == proxy.url
    assert pidfile.stat().st_mode & 0o777 == 0o600
    assert proxy.stop()[0] == 0
    assert not pidfile.exists()


def test_sigint_stops_cleanly(tmp_path):
    config = tmp_path / "config.json"
    config.write_text("{}")
    proxy = ForegroundProxy(sys.executable, config)
    code, log = proxy.stop(signal.SIGINT)
    assert code == 0 and "Traceback" not in log


def test_request_log_lines_when_log_is_on(tmp_path, upstream):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"log": True, "providers": [anthropic_provider(upstream)]}))
    proxy = ForegroundProxy(sys.executable, config)
    post_message(proxy.url)
    code, log = proxy.stop()
    assert re.search(r"req_\w+ POST /v1/messages route=first provider=anthropic model=m "
                     r"stream=false status=200 in=12 out=5 latency_ms=[\d.]+ ttft_ms=-", log)
    assert "hi" not in log.split("route=")[1]


def test_request_bodies_are_logged_only_when_asked(tmp_path, upstream):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"log": True, "log_bodies": True,
                                  "providers": [anthropic_provider(upstream)]}))
    proxy = ForegroundProxy(sys.executable, config)
    post_message(proxy.url)
    assert '"content": "hi"' in proxy.stop()[1]


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "config.json"
        config.write_text("{}")
        result = subprocess.run([sys.executable, SCRIPT, "start", "--foreground", "--port",
                                 str(port), "--config", str(config)], capture_output=True,
                                text=True, timeout=30, env=clean_env(tmp_path))
    assert result.returncode == 1                   # said once, plainly, as `start` says it
    assert result.stderr.count("port %d" % port) == 1 and "ccproxy ERROR port %d on 127.0.0.1 " \
        "is already in use (another program, or another user's ccproxy, listens there): " \
        "choose another with --port or the config's `port`" % port in result.stderr


def test_bad_config_stops_start_with_exit_1(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"port": "x"}')
    result = subprocess.run([sys.executable, SCRIPT, "start", "--foreground", "--config",
                             str(config)], capture_output=True, text=True, timeout=30,
                            env=clean_env(tmp_path))
    assert result.returncode == 1 and "port: must be a port number" in result.stderr


def test_docstring_lists_the_section_and_part_banners():
    """The map in the docstring is the file's banners, each at its depth, and the grep it
    gives finds nothing else (a comment line starting with a number would show in it)."""
    source = (REPO / "ccproxy.py").read_text()
    banners = re.findall(r"^# (\d+\.[\d.]* .+)$", source, re.M)
    assert banners == re.findall(r"^# (\d.*)$", source, re.M)
    listed = re.findall(r"^((?:    )+)(\d+\.[\d.]* .+)$", ccproxy.__doc__, re.M)
    assert banners == [title for _, title in listed]
    assert all(len(indent) == 4 * title.split(" ")[0].rstrip(".").count(".") + 4
               for indent, title in listed)
    assert len([b for b in banners if re.match(r"\d+\. ", b)]) == 12
    assert [b for b in banners if re.match(r"9\.\d ", b)][1:5] == [
        "9.2 Anthropic Messages (pass-through)", "9.3 OpenAI Chat Completions",
        "9.4 OpenAI Responses", "9.5 Gemini"]


def test_no_part_of_the_file_runs_past_650_lines_without_a_banner():
    """A section or part that grows past about 600 lines gets parts of its own."""
    lines = (REPO / "ccproxy.py").read_text().split("\n")
    marks = [n for n, line in enumerate(lines) if re.match(r"# \d+\.[\d.]* ", line)]
    spans = {lines[start]: end - start for start, end in zip(marks, marks[1:] + [len(lines)])}
    assert max(spans.values()) <= 650, max(spans, key=spans.get)


def test_pip_installs_a_ccproxy_command_and_a_module(tmp_path):
    """What `pip install` / `pipx install` from a checkout gives, built and installed offline."""
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "--no-build-isolation", "-w", str(tmp_path / "dist"), str(REPO)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "venv")], check=True, timeout=120)
    bin_dir = tmp_path / "venv" / ("Scripts" if os.name == "nt" else "bin")
    wheel = next((tmp_path / "dist").glob("ccproxy_py-*.whl"))
    subprocess.run([str(bin_dir / "python"), "-m", "pip", "install", "-q", "--no-index",
                    "--no-deps", str(wheel)], check=True, timeout=300, cwd=str(tmp_path))
    command = subprocess.run([str(bin_dir / "ccproxy"), "stop", "--help"], capture_output=True,
                             text=True, timeout=30, cwd=str(tmp_path))
    assert command.stdout.startswith("usage: ccproxy stop")
    module = subprocess.run([str(bin_dir / "python"), "-m", "ccproxy", "--version"],
                            capture_output=True, text=True, timeout=30, cwd=str(tmp_path))
    assert module.stdout.strip() == "ccproxy %s" % ccproxy.__version__


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_foreground_server_started_as_a_script_runs_from_the_bytecode_cache(tmp_path):
    """Run as a script, `start --foreground` becomes (same pid) a Python that imports the file
    as a module, as the background server is, instead of keeping a compiled script's memory."""
    config = tmp_path / "config.json"
    config.write_text('{"providers": []}')
    proxy = ForegroundProxy(sys.executable, config)
    try:
        command = Path("/proc/%d/cmdline" % proxy.process.pid).read_bytes().split(b"\0")
        assert command[1] == b"-c" and b"spec_from_file_location" in command[2]
        assert command[3:6] == [b"start", b"--foreground", b"--port"]
        assert post_message_status(proxy.url) == 400          # serving: no provider yet
        environment = Path("/proc/%d/environ" % proxy.process.pid).read_bytes().split(b"\0")
        assert (b"PYTHONMALLOC=malloc" in environment) == bool(ccproxy.malloc_trim_function())
    finally:
        status, output = proxy.stop()
    assert status == 0 and "ccproxy stopped" in output


def post_message_status(url):
    try:
        post_message(url)
    except urllib.error.HTTPError as error:
        return error.code
    return 200
