"""Benchmark: streams at scale. Each figure beside the same load sent straight to the mock in
the same run, with the ratio.

    python3 tests/bench_streams.py [--streams 1000] [--settle 30] [--bursts 4] [--quick]

Everything runs on 127.0.0.1: the stdlib OpenAI mock (tests/bench/mock_openai.py) in one
process, ccproxy (`start --foreground`, translating Anthropic to OpenAI) in another, and the
keep-alive load generator (tests/bench/loadgen.py) in a third; both tools are the project's
shared benchmark helpers. Rows:

  paced streams     --streams concurrent streams of 40 chunks 50 ms apart (2 s each), twice
                    that many in all: stream time p99 and time to first token p99; the CPU
                    all of the machine's CPUs spent from the start of the first burst to its
                    first token p99 (from /proc/stat), and its share of what they could do;
                    how ccproxy's event loop spent that time: on a CPU, waiting for one (in
                    the run queue), asleep (waiting for the GIL, or in epoll); from its schedstat
  memory            peak RSS over idle RSS per open stream; threads and RSS --settle s later,
                    and again after --bursts of the same paced bursts in a row
  burst sizes       the paced load again with 10, 100 and 300 streams starting at once: stream
                    time p99 and time to first token p99
  memory held       what an open stream holds with a 200 KB prompt (Claude Code's size late
                    in a session): ccproxy serving from a thread of this process, traced
  stream start      CPU per one-chunk stream, --streams of them started at once, twice:
                    ccproxy's (on its event loop apart; in user mode and in the kernel, and
                    its threads' context switches), the mock's, the load generator's
  CPU per chunk     200-chunk streams, 10 clients: CPU time per chunk, ccproxy and the mock
  CPU per request   JSON requests, 10 clients; and one after another, a Claude Code-like
                    session that grows by a turn at every request (60 to 80 turns)
  idle RSS          `start --foreground`, from the bytecode cache
  status line       as Claude Code runs it on every prompt: the command `code
                    --statusline` installs, and `status --statusline`
  throughput        JSON requests/s and 200-chunk streams/s at 1, 10 and 50 clients
  round's start     this build beside the one issue #11's round began with (git show 9bb152e),
                    both serving the mock, measured in turns: CPU per JSON request and per
                    translated chunk (targets set against that build) and throughput at 1, 10
                    and 50 clients (which may not fall)
  bare relay        tests/bench/floor_relay.py, a relay that only relays: with ccproxy's
                    architecture (a worker thread sends to the mock through http.client, the
                    event loop reads the answer), the same sending through a urllib opener (the
                    least the design that keeps urllib can spend), with the one before it (the
                    thread also waits for the answer's head), and with the call made by the
                    event loop, then that with 0.1 and 0.3 ms of CPU spent on every request, as
                    a proxy's own work: paced streams, stream start (CPU on the event loop and
                    on the worker threads apart), JSON request
  peer              where node and npm are: Claude Code Router 2.0.0 (installed into
                    ~/.cache/ccproxy-bench/ccr, never globally) on the same mock: paced
                    streams, memory, CPU per chunk, streams/s, the growing session

Machines differ and shared ones drift: compare the ratios, not the absolute figures. Not part
of the test suite (nothing here is asserted), but it needs the test dependencies:
`python3 -m pip install -e ".[test]"`.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import py_compile
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_proxy import REPO, free_port, wait_healthy  # noqa: E402

TOOLS = REPO / "tests" / "bench"


class MachineCPU:
    """The CPU time the whole machine spends (all CPUs, every process), sampled from /proc/stat
    every 10 ms by a thread while the `with` block runs, against time.monotonic(); with
    `thread` (pid, tid), also that thread's time on a CPU and waiting for one (its schedstat,
    in ns)."""

    def __init__(self, thread: tuple | None = None):
        schedstat = thread and Path("/proc/%d/task/%d/schedstat" % thread)
        self.schedstat = schedstat if schedstat and schedstat.exists() else None  # built in?

    def __enter__(self):
        self.samples, self._done = [], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()

    def _sample(self) -> None:
        schedstat = self.schedstat
        while not self._done.is_set():
            values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
            busy = sum(values[i] for i in (0, 1, 2, 5, 6))   # user, nice, system, irq, softirq
            on_cpu, waiting = ([int(v) / 1e9 for v in schedstat.read_text().split()[:2]]
                               if schedstat else (0, 0))
            self.samples.append((time.monotonic(), busy / os.sysconf("SC_CLK_TCK"), on_cpu,
                                 waiting))
            self._done.wait(0.01)

    def spent_between(self, start: float, end: float) -> tuple:
        """(machine CPU seconds, the thread's on a CPU, the thread's waiting for one) from start
        to end (time.monotonic() values), to the nearest samples."""
        def nearest(moment):
            return min(self.samples, key=lambda sample: abs(sample[0] - moment))[1:]
        return tuple(b - a for a, b in zip(nearest(start), nearest(end)))


def first_burst_spent(result: dict, machine: MachineCPU) -> tuple | None:
    """(the span from a paced load's start to its first burst's ttft p99, then what
    spent_between() gives for it); None when no stream of that burst answered."""
    if not result.get("first_burst_ttft_p99_ms"):
        return None
    seconds = result["first_burst_ttft_p99_ms"] / 1000
    return (seconds,) + machine.spent_between(result["go_monotonic"],
                                              result["go_monotonic"] + seconds)


def first_burst_cpu(result: dict, machine: MachineCPU) -> str:
    """The CPU the machine spent until its first burst's ttft p99, and its share of what all
    CPUs could have done meanwhile."""
    spent = first_burst_spent(result, machine)
    if spent is None:
        return "-"
    seconds, busy, _, _ = spent
    return "%.2f s, %.0f%%" % (busy, 100 * busy / (seconds * os.cpu_count()))


def first_burst_loop(result: dict, machine: MachineCPU) -> str:
    """Where the event loop's time went until its first burst's ttft p99: on a CPU, waiting
    for one (the run queue), and the rest, asleep (for the GIL or in epoll)."""
    spent = first_burst_spent(result, machine)
    if spent is None or machine.schedstat is None:
        return "-"
    seconds, _, on_cpu, waiting = spent
    return "%.2f / %.2f / %.2f s" % (on_cpu, waiting, seconds - on_cpu - waiting)


def status_of(pid: int) -> dict:
    """VmRSS and VmHWM in KB, and Threads, from /proc."""
    fields = {}
    for line in Path("/proc/%d/status" % pid).read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "Threads"):
            fields[name] = int(value.split()[0])
    return fields


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """CPU seconds a process has spent (its threads that have ended too), or one thread."""
    return sum(user_and_kernel_seconds(pid, thread))


def user_and_kernel_seconds(pid: int, thread: int | None = None) -> tuple:
    """(CPU seconds in user mode, in the kernel) of a process or one of its threads."""
    path = "/proc/%d/stat" % pid if thread is None else "/proc/%d/task/%d/stat" % (pid, thread)
    parts = Path(path).read_text().rsplit(")", 1)[1].split()
    return int(parts[11]) / os.sysconf("SC_CLK_TCK"), int(parts[12]) / os.sysconf("SC_CLK_TCK")


def thread_switches(pid: int) -> int:
    """How often the process's live threads have left a CPU, waiting (for the GIL, a lock, a
    socket) or put off by the scheduler: voluntary and involuntary context switches."""
    total = 0
    for status in Path("/proc/%d/task" % pid).glob("*/status"):
        try:
            total += sum(int(line.split()[1]) for line in status.read_text().splitlines()
                         if line.split(":")[0].endswith("ctxt_switches"))
        except (OSError, IndexError, ValueError):     # a thread that ended meanwhile
            pass
    return total


def load(url: str, mode: str, **options) -> dict:
    """One loadgen run: its JSON result."""
    command = [sys.executable, str(TOOLS / "loadgen.py"), url, "--mode", mode]
    for name, value in options.items():
        command += ["--" + name.replace("_", "-"), str(value)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900)
    lines = [line for line in result.stdout.splitlines() if line.startswith("{")]
    if not lines:
        raise SystemExit("loadgen failed: " + result.stderr[-2000:])
    return json.loads(lines[-1])


def measured(pid: int, run) -> tuple:
    """(run()'s result, CPU seconds the process spent during it)."""
    before = cpu_seconds(pid)
    outcome = run()
    return outcome, cpu_seconds(pid) - before


class Processes:
    """The mock and ccproxy, started and stopped together."""

    def __init__(self, home: Path):
        self.mock_port, self.proxy_port = free_port(), free_port()
        self.mock = subprocess.Popen([sys.executable, str(TOOLS / "mock_openai.py"), "--port",
                                      str(self.mock_port)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.mock_url = "http://127.0.0.1:%d" % self.mock_port
        self.proxy_url = "http://127.0.0.1:%d" % self.proxy_port
        self.proxy = start_ccproxy(home, REPO / "ccproxy.py", self.proxy_port, self.mock_port,
                                   [{"name": "mock-model", "context_window": 400000}])  # gpt-5's
        wait_healthy(self.mock_url)

    def stop(self) -> None:
        for process in (self.proxy, self.mock):
            process.terminate()
            process.wait(30)


def start_ccproxy(home: Path, source: Path, port: int, mock_port: int, models: list):
    """`start --foreground` of the ccproxy.py at `source` (from its bytecode cache, as a server
    `start` makes runs), HOME at `home`, serving `models` of the mock: the process, answering."""
    config = home / "config.json"
    config.write_text(json.dumps({"port": port, "providers": [
        {"name": "mock", "type": "openai", "api_key": "sk-bench-0123456789",
         "api_base_url": "http://127.0.0.1:%d/v1" % mock_port, "models": models}]}))
    os.chmod(config, 0o600)
    py_compile.compile(str(source))
    environment = dict(os.environ, HOME=str(home))
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    process = subprocess.Popen([sys.executable, str(source), "start", "--foreground",
                                "--config", str(config)], stderr=subprocess.DEVNULL,
                               env=environment)
    wait_healthy("http://127.0.0.1:%d" % port)
    return process


def row(name: str, straight: str, proxied: str, ratio: str = "") -> None:
    print("%-44s %16s %16s %14s" % (name, straight, proxied, ratio))


def paced_rows(label: str, straight: dict, proxied: dict) -> None:
    """A paced load's stream time p99 (as a ratio) and first token p99 (as the time added),
    beside the same load sent straight to the mock."""
    row("%s: stream time p99" % label, "%.2f s" % (straight["p99_ms"] / 1000),
        "%.2f s" % (proxied["p99_ms"] / 1000), "%.2f×" % (proxied["p99_ms"] / straight["p99_ms"]))
    row("%s: time to first token p99" % label, "%.3f s" % (straight["ttft_p99_ms"] / 1000),
        "%.3f s" % (proxied["ttft_p99_ms"] / 1000),
        "+%.3f s" % ((proxied["ttft_p99_ms"] - straight["ttft_p99_ms"]) / 1000))


def paced_shape(streams: int) -> dict:
    """The paced load: `streams` clients, each twice a stream of 40 chunks 50 ms apart."""
    return dict(stream=1, conc=streams, n=2 * streams, chunks=40, delay_ms=50)


BURST_SIZES = (10, 100, 300)


def paced_by_burst_size(run: Processes) -> None:
    """The paced load's first token at smaller bursts: how many streams may start in the same
    instant, on this machine, within the target."""
    for streams in BURST_SIZES:
        straight = load(run.mock_url, "openai", **paced_shape(streams))
        proxied = load(run.proxy_url, "anthropic", **paced_shape(streams))
        paced_rows("  %d at once" % streams, straight, proxied)


def paced(run: Processes, streams: int, settle: float, bursts: int) -> None:
    pid = run.proxy.pid
    time.sleep(1)
    idle = status_of(pid)
    shape = paced_shape(streams)
    with MachineCPU() as straight_machine:
        straight = load(run.mock_url, "openai", **shape)
    with MachineCPU((pid, pid)) as proxied_machine:
        proxied = load(run.proxy_url, "anthropic", **shape)
    peak = status_of(pid)
    paced_rows("paced streams", straight, proxied)
    row("paced streams: time to first token p50", "%.3f s" % (straight["ttft_p50_ms"] / 1000),
        "%.3f s" % (proxied["ttft_p50_ms"] / 1000),
        "+%.3f s" % ((proxied["ttft_p50_ms"] - straight["ttft_p50_ms"]) / 1000))
    row("  machine CPU until the first burst's p99", first_burst_cpu(straight, straight_machine),
        first_burst_cpu(proxied, proxied_machine))
    row("  its event loop: on a CPU / waiting / asleep", "-",
        first_burst_loop(proxied, proxied_machine))
    row("memory per open stream", "-", "%.0f KB" % ((peak["VmHWM"] - idle["VmRSS"]) / streams))
    if proxied["errors"] or straight["errors"]:
        row("errors", str(straight["errors"]), str(proxied["errors"]))
    time.sleep(settle)
    after = status_of(pid)
    row("%g s after the burst: threads, RSS kept" % settle, "-",
        "%d, +%.1f MB" % (after["Threads"], (after["VmRSS"] - idle["VmRSS"]) / 1024))
    for _ in range(bursts - 1):
        load(run.proxy_url, "anthropic", **shape)
        time.sleep(settle)
    if bursts > 1:
        after = status_of(pid)
        row("same after %d bursts in a row" % bursts, "-",
            "%d, +%.1f MB" % (after["Threads"], (after["VmRSS"] - idle["VmRSS"]) / 1024))


def held_per_stream(run: Processes, streams: int = 100, prompt_chars: int = 200000) -> None:
    """The memory an open stream holds with a large prompt, once every stream is open: ccproxy
    serving the mock from a thread of this process, its allocations traced (tracemalloc). The
    RSS rows cannot show it: a burst parses every body at once, and what is freed after stays
    with the allocator for the requests that follow."""
    from helpers import RunningProxy, traced_by_ccproxy
    import ccproxy
    config = ccproxy.build_config({"port": 0, "providers": [
        {"name": "mock", "type": "openai", "api_key": "sk-bench-0123456789",
         "api_base_url": run.mock_url + "/v1", "models": ["mock-model"]}]}, "bench.json", {})
    proxy = RunningProxy(config)
    tracemalloc.start(40)
    try:
        before = traced_by_ccproxy()
        client = subprocess.Popen([sys.executable, str(TOOLS / "loadgen.py"), proxy.url,
                                   "--stream", "1", "--conc", str(streams), "--n", str(streams),
                                   "--warmup", "0", "--chunks", "100", "--delay-ms", "50",
                                   "--prompt-chars", str(prompt_chars)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proxy.server.app.active_streams < streams and client.poll() is None:
            time.sleep(0.02)
        held = traced_by_ccproxy() - before
        client.wait(120)
    finally:
        tracemalloc.stop()
        proxy.stop()
    row("memory held per open stream, %d KB prompts" % (prompt_chars // 1000), "-",
        "%.0f KB" % (held / streams / 1024))


def start_shape(streams: int) -> dict:
    """The burst of starts: `streams` clients, each twice a one-chunk stream, no warm-up."""
    return dict(stream=1, conc=streams, n=2 * streams, chunks=1, warmup=0)


def start_cost(run: Processes, streams: int) -> None:
    """CPU per stream when `streams` one-chunk streams start at once, twice over: what a burst's
    time to first token is made of (the last stream waits for the ones started before it)."""
    shape = start_shape(streams)
    straight, mock_cpu = measured(run.mock.pid, lambda: load(run.mock_url, "openai", **shape))
    proxied, proxy_cpu, loop_cpu, spent = started_on_loop(run.proxy.pid, lambda: load(
        run.proxy_url, "anthropic", **shape))
    row("CPU per stream started (%d at once)" % streams, "mock %.2f ms" % (
        mock_cpu / (2 * streams) * 1e3), "%.2f ms" % (proxy_cpu / (2 * streams) * 1e3),
        "%.1f×" % (proxy_cpu / mock_cpu))
    row("  of which on the event loop", "-", "%.2f ms" % (loop_cpu / (2 * streams) * 1e3))
    cpu_split_rows(spent, 2 * streams)
    row("  the load generator's, per stream started", "%.2f ms" % straight[
        "loadgen_cpu_ms_per_req"], "%.2f ms" % proxied["loadgen_cpu_ms_per_req"])


def started_on_loop(pid: int, run) -> tuple:
    """(run()'s result, CPU seconds the process spent during it, the share of its main thread,
    the event loop (the rest is the worker threads'), and its split for cpu_split_rows():
    the process's and the loop's CPU in user mode and in the kernel, and thread switches)."""
    before = user_and_kernel_seconds(pid) + user_and_kernel_seconds(pid, pid)
    switches_before = thread_switches(pid)
    outcome = run()
    after = user_and_kernel_seconds(pid) + user_and_kernel_seconds(pid, pid)
    user, kernel, loop_user, loop_kernel = [b - a for a, b in zip(before, after)]
    return outcome, user + kernel, loop_user + loop_kernel, dict(
        user=user, kernel=kernel, loop_user=loop_user, loop_kernel=loop_kernel,
        switches=thread_switches(pid) - switches_before)


def cpu_split_rows(spent: dict, starts: int) -> None:
    """The stream-start rows that say what the CPU time is: Python running (user mode), or
    system calls and thread switches (the kernel), all threads' and the event loop's; and how
    often the threads switched."""
    for name, user, kernel in (("all threads'", "user", "kernel"),
                               ("the loop's", "loop_user", "loop_kernel")):
        row("  %s in user mode / in the kernel" % name, "-", "%.2f / %.2f ms" % (
            spent[user] / starts * 1e3, spent[kernel] / starts * 1e3))
    row("  thread switches per stream started", "-", "%.1f" % (spent["switches"] / starts))


def cpu_rows(run: Processes, requests: int) -> None:
    mock, proxy = run.mock.pid, run.proxy.pid
    shape = dict(stream=1, conc=10, n=requests, chunks=200)
    _, mock_cpu = measured(mock, lambda: load(run.mock_url, "openai", **shape))
    _, proxy_cpu = measured(proxy, lambda: load(run.proxy_url, "anthropic", **shape))
    chunks = requests * 200
    row("CPU per translated chunk (200-chunk, 10 clients)", "mock %.1f µs" % (
        mock_cpu / chunks * 1e6), "%.1f µs" % (proxy_cpu / chunks * 1e6),
        "%.2f×" % (proxy_cpu / mock_cpu))
    _, proxy_cpu = measured(proxy, lambda: load(run.proxy_url, "anthropic", stream=0, conc=10,
                                                n=requests * 4))
    row("CPU per JSON request (10 clients)", "-", "%.2f ms" % (proxy_cpu / requests / 4 * 1e3))


def session_body(turns: int) -> bytes:
    """A Claude Code-like request: a 15 KB system prompt, 12 tools, and `turns` turns that each
    read a 4 KB file (thinking, text, tool call, its result), the whole conversation sent again
    at every turn as Claude Code does."""
    tools = [{"name": "Tool%d" % n, "description": "Does task %d with care. " % n * 20,
              "input_schema": {"type": "object", "properties": {
                  "path": {"type": "string", "description": "Where. " * 20}}}}
             for n in range(12)]
    messages = [{"role": "user", "content": "Fix the failing test in src/. mock.chunks=5"}]
    for n in range(turns):
        messages += [
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "The next file to read is f%d. " % n * 4,
                 "signature": "ccpx1.mock"},
                {"type": "text", "text": "Reading src/f%d.py." % n},
                {"type": "tool_use", "id": "toolu_%03d" % n, "name": "Tool0",
                 "input": {"path": "src/f%d.py" % n}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_%03d" % n,
                                          "content": "def f%d(x):  # line\n" % n * 200}]}]
    return json.dumps({"model": "claude-sonnet-4-5", "max_tokens": 1024, "tools": tools,
                       "system": [{"type": "text", "text": "You are Claude Code. " * 700}],
                       "messages": messages}).encode()


def session_cost(url: str, pid: int, mock_pid: int, label: str = "", turns: int = 60,
                 requests: int = 20) -> None:
    """CPU per request of a growing session, one request after another: what a Claude Code
    user's turn costs the proxy (and the mock, which reads the translated body)."""
    def send_all():
        for turn in range(turns, turns + requests):
            request = urllib.request.Request(url + "/v1/messages", data=session_body(turn),
                                             method="POST",
                                             headers={"content-type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as answer:
                answer.read()
    size = len(session_body(turns + requests - 1)) // 1024
    mock_before = cpu_seconds(mock_pid)
    _, proxy_cpu = measured(pid, send_all)
    mock_cpu = cpu_seconds(mock_pid) - mock_before
    row("%sCPU per request, a growing session (%d KB)" % (label, size), "mock %.1f ms" % (
        mock_cpu / requests * 1e3), "%.1f ms" % (proxy_cpu / requests * 1e3),
        "%.1f×" % (proxy_cpu / mock_cpu))


def throughput_rows(run: Processes, requests: int) -> None:
    for clients in (1, 10, 50):
        json_rate = load(run.proxy_url, "anthropic", stream=0, conc=clients, n=requests * 4)
        stream_rate = load(run.proxy_url, "anthropic", stream=1, conc=clients, n=requests,
                           chunks=200)
        straight = load(run.mock_url, "openai", stream=1, conc=clients, n=requests, chunks=200)
        row("%d client%s: JSON req/s, 200-chunk streams/s" % (clients, "s" * (clients > 1)),
            "%.0f streams/s" % straight["rps"],
            "%.0f, %.0f" % (json_rate["rps"], stream_rate["rps"]))


FLOOR_MODES = (("thread", 0.0, "bare relay (thread)"), ("urllib", 0.0, "bare relay (urllib)"),
               ("thread-head", 0.0, "bare relay (thread reads head)"),
               ("asyncio", 0.0, "bare relay (asyncio)"),
               ("asyncio", 0.1, "asyncio +0.1 ms work"), ("asyncio", 0.3, "asyncio +0.3 ms work"))


def floor_rows(run: Processes, streams: int, requests: int) -> None:
    """The rows issue #11 sets targets for, again through tests/bench/floor_relay.py: a relay that
    does nothing but relay, with ccproxy's architecture (a worker thread making the upstream call
    with http.client, or through a urllib opener as ccproxy does) and with the upstream call made
    by the event loop instead; then the latter spending some CPU of its own on every request, as
    a proxy's checks, routing and translation would. Where ccproxy stands against the least its
    architecture can spend, what a different one would give, and how much work of its own each
    target leaves a proxy."""
    row("", "straight to mock", "bare relay", "ratio")
    straight = load(run.mock_url, "openai", **paced_shape(streams))
    for mode, work_ms, name in FLOOR_MODES:
        port = free_port()
        relay = subprocess.Popen([sys.executable, str(TOOLS / "floor_relay.py"), "--port",
                                  str(port), "--upstream-port", str(run.mock_port),
                                  "--upstream", mode, "--work-ms", str(work_ms)],
                                 stderr=subprocess.DEVNULL)
        try:
            relay_rows("http://127.0.0.1:%d" % port, relay.pid, name, straight, streams,
                       requests)
        finally:
            relay.terminate()
            relay.wait(30)


def relay_rows(url: str, pid: int, name: str, straight: dict, streams: int,
               requests: int) -> None:
    """One bare relay's rows: paced streams, stream start, JSON request."""
    wait_healthy(url)
    paced_run = load(url, "anthropic", **paced_shape(streams))
    paced_rows("%s: paced" % name, straight, paced_run)
    started, cpu, loop_cpu, spent = started_on_loop(pid, lambda: load(url, "anthropic",
                                                                      **start_shape(streams)))
    row("%s: CPU per stream started" % name, "-", "%.2f ms" % (cpu / (2 * streams) * 1e3))
    row("  of which on the event loop", "-", "%.2f ms" % (loop_cpu / (2 * streams) * 1e3))
    cpu_split_rows(spent, 2 * streams)
    answered, cpu = measured(pid, lambda: load(url, "anthropic", stream=0, conc=10,
                                               n=requests * 4))
    row("%s: CPU per JSON request" % name, "-", "%.2f ms" % (cpu / requests / 4 * 1e3))
    errors = sum(result["errors"] for result in (paced_run, started, answered))
    if errors:
        row("%s: errors" % name, "-", str(errors))


ROUND_START = "9bb152e"     # the build issue #11's round began with (JSON request: 0.38 ms)


def round_start_rows(run: Processes, home: Path, requests: int, rounds: int = 8) -> None:
    """This build beside the one issue #11's round began with, both serving the mock at once and
    measured in turns (each names the model without a window, as that build requires): CPU per
    JSON request and per translated chunk, whose targets were set against that build (0.38 ->
    0.30 ms, 21% less; 14.8 -> 8 µs, 46% less), and the throughput that may not fall. Needs git
    and the repository's history."""
    source = subprocess.run(["git", "-C", str(REPO), "show", ROUND_START + ":ccproxy.py"],
                            capture_output=True, text=True) if shutil.which("git") else None
    if source is None or source.returncode != 0:
        print("round's first build: not measured (%s)" % (
            "no git here" if source is None else source.stderr.strip()))
        return
    builds = []
    for name, text in (("first", source.stdout), ("this", None)):
        folder, port = home / ("build-" + name), free_port()
        folder.mkdir()
        path = folder / "ccproxy.py"
        path.write_text(text if text is not None else (REPO / "ccproxy.py").read_text())
        builds.append((start_ccproxy(folder, path, port, run.mock_port, ["mock-model"]),
                       "http://127.0.0.1:%d" % port))
    try:
        row("", "first (%s)" % ROUND_START, "this build", "change")
        cpu_in_turns(builds, rounds)
        throughput_in_turns(builds, requests)
    finally:
        for process, _ in builds:
            process.terminate()
            process.wait(30)


def cpu_in_turns(builds: list, rounds: int, requests: int = 1500) -> None:
    """CPU per JSON request and per translated chunk (200-chunk streams), 10 clients, each
    build's median over `rounds` turns."""
    for name, unit, scale, shape in (
            ("CPU per JSON request", "ms", 1e3, dict(stream=0, n=requests)),
            ("CPU per translated chunk", "µs", 1e6, dict(stream=1, n=requests // 10,
                                                         chunks=200))):
        count = shape["n"] * shape.get("chunks", 1)
        for _, url in builds:
            load(url, "anthropic", conc=10, **shape)                      # warmed up
        spent = [[] for _ in builds]
        for _ in range(rounds):
            for (process, url), cpu in zip(builds, spent):
                cpu.append(measured(process.pid, lambda: load(url, "anthropic", conc=10,
                                                               **shape))[1] / count)
        medians = [sorted(cpu)[len(cpu) // 2] * scale for cpu in spent]
        row("%s, median of %d turns" % (name, rounds), "%.2f %s" % (medians[0], unit),
            "%.2f %s" % (medians[1], unit), "%+.0f%%" % (100 * (medians[1] / medians[0] - 1)))


def throughput_in_turns(builds: list, requests: int) -> None:
    """JSON requests/s and 200-chunk streams/s at 1, 10 and 50 clients, the better of two turns
    each (the machine drifts between turns more than between the builds)."""
    for clients in (1, 10, 50):
        for what, shape in (("JSON req/s", dict(stream=0, n=requests * 4)),
                            ("200-chunk streams/s", dict(stream=1, n=requests, chunks=200))):
            best = [0.0 for _ in builds]
            for _ in range(2):
                for index, (_, url) in enumerate(builds):
                    rate = load(url, "anthropic", conc=clients, **shape)["rps"]
                    best[index] = max(best[index], rate)
            row("%s, %d client%s" % (what, clients, "s" * (clients > 1)), "%.0f" % best[0],
                "%.0f" % best[1], "%+.0f%%" % (100 * (best[1] / best[0] - 1)))


PEER_PACKAGE = "@musistudio/claude-code-router@2.0.0"
PEER_CACHE = Path.home() / ".cache" / "ccproxy-bench" / "ccr"
PEER_CLI = PEER_CACHE / "node_modules" / "@musistudio" / "claude-code-router" / "dist" / "cli.js"


def start_peer(run: Processes, home: Path):
    """The peer, Claude Code Router 2.0.0, installed into a cache directory (never globally) and
    routed to the same mock: (process, url), or None, saying why, where it cannot run."""
    if not PEER_CLI.exists():
        if not (shutil.which("npm") and shutil.which("node")):
            print("peer: not measured (no node and npm here)")
            return None
        installed = subprocess.run(["npm", "install", "--no-audit", "--no-fund", "--prefix",
                                    str(PEER_CACHE), PEER_PACKAGE], capture_output=True,
                                   text=True, timeout=600)
        if installed.returncode != 0 or not PEER_CLI.exists():
            print("peer: not measured (npm install failed: %s)" % installed.stderr[-300:])
            return None
    peer_home, port = home / "peer", free_port()
    (peer_home / ".claude-code-router").mkdir(parents=True)
    (peer_home / ".claude-code-router" / "config.json").write_text(json.dumps({
        "PORT": port, "HOST": "127.0.0.1", "LOG": False, "Router": {"default": "mock,mock-model"},
        "Providers": [{"name": "mock", "api_base_url": run.mock_url + "/v1/chat/completions",
                       "api_key": "sk-bench-0123456789", "models": ["mock-model"]}]}))
    process = subprocess.Popen(["node", str(PEER_CLI), "start"], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=dict(os.environ, HOME=str(peer_home)))
    url = "http://127.0.0.1:%d" % port
    wait_healthy(url, 30)
    return process, url


def peer_rows(run: Processes, home: Path, streams: int, requests: int) -> None:
    """The paced streams, memory and CPU per chunk rows again, through the peer."""
    started = start_peer(run, home)
    if started is None:
        return
    process, url = started
    try:
        row("", "straight to mock", "peer (CCR 2.0.0)", "ratio")
        time.sleep(1)
        idle = status_of(process.pid)
        shape = paced_shape(streams)
        straight, peer = load(run.mock_url, "openai", **shape), load(url, "anthropic", **shape)
        peak = status_of(process.pid)
        paced_rows("peer: paced streams", straight, peer)
        row("peer: idle RSS, peak RSS", "-", "%.0f MB, %.0f MB" % (
            idle["VmRSS"] / 1024, peak["VmHWM"] / 1024))
        shape = dict(stream=1, conc=10, n=requests, chunks=200)
        _, mock_cpu = measured(run.mock.pid, lambda: load(run.mock_url, "openai", **shape))
        rate, peer_cpu = measured(process.pid, lambda: load(url, "anthropic", **shape))
        row("peer: CPU per translated chunk", "mock %.1f µs" % (mock_cpu / requests / 200 * 1e6),
            "%.1f µs" % (peer_cpu / requests / 200 * 1e6), "%.2f×" % (peer_cpu / mock_cpu))
        row("peer: 200-chunk streams/s, 10 clients", "-", "%.0f" % rate["rps"])
        session_cost(url, process.pid, run.mock.pid, "peer: ")
    finally:
        process.terminate()
        process.wait(30)


def statusline_time(run: Processes, home: Path) -> None:
    """How long the status line takes (it runs on every prompt), median of 20, beside a Python
    that does nothing: the command `code --statusline` installs, and the script form."""
    environment = dict(os.environ, HOME=str(home))
    environment.pop("PYTHONDONTWRITEBYTECODE", None)
    urllib.request.urlopen(urllib.request.Request(run.proxy_url + "/v1/messages", data=json.dumps(
        {"model": "mock,mock-model", "max_tokens": 5, "messages": [{"role": "user",
                                                                     "content": "hi"}]}).encode(),
        headers={"content-type": "application/json", "x-claude-code-session-id": "bench"})).read()
    sys.path.insert(0, str(REPO))
    import ccproxy
    os.environ["HOME"], real_home = str(home), os.environ["HOME"]
    installed = ccproxy.statusline_command()
    os.environ["HOME"] = real_home
    script = "%s %s status --statusline" % (sys.executable, REPO / "ccproxy.py")
    bare = median_time("%s -c pass" % sys.executable, environment)[0]
    for name, command in (("code --statusline's command", installed),
                          ("python3 ccproxy.py status --statusline", script)):
        seconds, line = median_time(command, environment)
        row(name, "python -c pass: %.0f ms" % (bare * 1000), "%.0f ms" % (seconds * 1000))
    print("    " + line)


def median_time(command: str, environment: dict) -> tuple:
    """(median seconds of 20 runs, the last output line) of a shell command given a session."""
    times = []
    for _ in range(20):
        started = time.perf_counter()
        line = subprocess.run(command, shell=True, input='{"session_id": "bench"}',
                              capture_output=True, text=True, env=environment).stdout.strip()
        times.append(time.perf_counter() - started)
    return sorted(times)[10], line


def idle_rss(home: Path) -> float:
    """RSS (MB) of a fresh `start --foreground` that has served nothing."""
    run = Processes(home)
    try:
        time.sleep(1)
        return status_of(run.proxy.pid)["VmRSS"] / 1024
    finally:
        run.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--settle", type=float, default=30.0)
    parser.add_argument("--bursts", type=int, default=4, help="paced bursts in a row, each "
                        "followed by --settle s, for the memory a server keeps over time")
    parser.add_argument("--quick", action="store_true", help="fewer requests per row")
    options = parser.parse_args()
    try:
        importlib.import_module("helpers")   # held_per_stream serves as the tests do
    except ImportError as missing:
        raise SystemExit("the benchmark needs the test dependencies (%s): python3 -m pip install "
                         "-e \".[test]\"" % missing)
    requests = 200 if options.quick else 1000
    print("%d CPUs, Python %s, %s" % (os.cpu_count(), sys.version.split()[0], sys.platform))
    row("", "straight to mock", "ccproxy", "ratio")
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder)
        row("idle RSS, start --foreground", "-", "%.1f MB" % idle_rss(home))
        run = Processes(home)
        try:
            statusline_time(run, home)
            paced(run, options.streams, options.settle, options.bursts)
            paced_by_burst_size(run)
            held_per_stream(run)
            start_cost(run, options.streams)
            cpu_rows(run, requests)
            session_cost(run.proxy_url, run.proxy.pid, run.mock.pid)
            throughput_rows(run, requests)
            round_start_rows(run, home, requests)
            floor_rows(run, options.streams, requests)
            peer_rows(run, home, options.streams, requests)
        finally:
            run.stop()


if __name__ == "__main__":
    main()
