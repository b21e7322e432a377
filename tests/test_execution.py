"""The sandbox (execution.py): one test per misbehaviour of generated code, plus the legitimate
programs that must keep passing and the fraction-of-asserts labeler.

Every misbehaving program must end as not passed within its timeout (plus slack), leave the host
unharmed (canary files intact, no connection made, nothing left running or on disk) and leave the
sandbox usable for the next program."""
import os
import shutil
import socket
import stat
import tempfile
import textwrap
import time

import pytest

from execution import Sandbox, build_program, check_correctness, check_program, instrument_check, run_many

TIMEOUT = 1.0
SLACK = 5.0  # generous: the machine may be busy; what matters is that the program was stopped


@pytest.fixture(scope="module")
def sb():
    with Sandbox(workers=2) as box:
        yield box


@pytest.fixture(scope="module")
def bare():
    """Audit-hook guard, seccomp, Landlock, the private mounts and the uid drop off: what the
    remaining layers (process group, subreaper, rlimits) hold on their own."""
    with Sandbox(workers=1, disable=("guard", "seccomp", "uid", "landlock", "mountns")) as box:
        yield box


@pytest.fixture
def open_dir():
    """A world-writable directory, so that only the sandbox (not file permissions) protects it."""
    path = tempfile.mkdtemp(prefix="sandbox-test-")
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run(box, program, timeout=TIMEOUT, **kw):
    t0 = time.monotonic()
    res = box.run_programs([textwrap.dedent(program)], timeout=timeout, **kw)[0]
    res["elapsed"] = time.monotonic() - t0
    return res


def assert_stopped(res, timeout=TIMEOUT):
    assert res["passed"] is False, res
    assert res["elapsed"] < timeout + SLACK, res


def assert_healthy(box):
    """The sandbox still runs a good program, has no process left and nothing on disk."""
    assert run(box, "def check(c):\n    assert c(2) == 4\ncheck(lambda x: x * x)")["passed"]
    for w in box.workers:
        pid = w.proc.pid
        assert w.proc.poll() is None, "a worker died"
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            assert f.read().split() == [], "a process was left running"
    assert os.listdir(box.base) == [], "a working directory was left behind"


# ----------------------------------------------------------------------------- legitimate programs

LEGIT = {
    "stdlib": """
        import collections, itertools, math, re, functools, typing, heapq, bisect, string, random
        from typing import List, Dict, Optional
        def f(xs: List[int]) -> Dict[int, int]:
            return dict(collections.Counter(itertools.chain(xs, [math.floor(2.5)])))
        def check(c):
            assert c([1, 2]) == {1: 1, 2: 2}
            assert re.sub(r"a+", "b", "caat") == "cbt"
            assert functools.reduce(lambda a, b: a + b, [1, 2, 3]) == 6
        check(f)
    """,
    "printing": """
        def f(x):
            print("debug", x)
            print("to stderr", file=__import__("sys").stderr)
            return x
        def check(c):
            for i in range(1000):
                print(i)
            assert c(3) == 3
        check(f)
    """,
    "recursion_500": """
        def depth(n):
            return 0 if n == 0 else 1 + depth(n - 1)
        def check(c):
            assert c(500) == 500
            assert c(2000) == 2000
        check(depth)
    """,
    "classes_and_helper_after_entry_point": """
        def solve(xs):
            return Stack(xs).total() + helper(1)
        class Stack:
            def __init__(self, xs):
                self.xs = list(xs)
            def total(self):
                return sum(self.xs)
        def helper(x):
            return x * 10
        def check(c):
            assert c([1, 2, 3]) == 16
        check(solve)
    """,
    "files_inside_its_directory": """
        import os, shutil, tempfile
        def f():
            with open("scratch.txt", "w") as fh:
                fh.write("hello")
            with tempfile.NamedTemporaryFile("w", delete=False) as fh:
                fh.write("x")
            os.makedirs("a/b/c")
            open("a/b/c/d.txt", "w").close()
            shutil.rmtree("a")
            os.remove("scratch.txt")
            return os.path.exists("scratch.txt") or os.path.exists("a")
        def check(c):
            assert c() is False
        check(f)
    """,
    "exceptions_handled_inside": """
        def f(x):
            try:
                return int(x)
            except ValueError:
                return -1
        def check(c):
            assert c("12") == 12 and c("zz") == -1
        check(f)
    """,
}


@pytest.mark.parametrize("name", sorted(LEGIT))
def test_legitimate_program_passes(sb, name):
    res = run(sb, LEGIT[name], timeout=3.0)
    assert res["passed"], res
    assert res["result"] == "passed"


def test_output_is_captured(sb):
    res = run(sb, "print('hello from the sandbox')")
    assert res["passed"] and "hello from the sandbox" in res["output"]


def test_failing_program_reports_the_exception(sb):
    assert run(sb, "def check(c):\n    assert c(1) == 2\ncheck(abs)")["result"] == "failed: AssertionError"
    assert run(sb, "raise ValueError('bad input')")["result"] == "failed: ValueError: bad input"
    assert run(sb, "def f(:\n  pass")["result"].startswith("failed: SyntaxError")


# ----------------------------------------------------------------------------- misbehaviours

def test_infinite_loop(sb):
    res = run(sb, "while True:\n    pass")
    assert_stopped(res)
    assert res["result"] == "timed out"
    assert_healthy(sb)


def test_long_sleep(sb):
    res = run(sb, "import time\ntime.sleep(60)")
    assert_stopped(res)
    assert res["result"] == "timed out"


def test_ignored_sigterm(sb):
    res = run(sb, """
        import signal
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, signal.SIG_IGN)
        while True:
            pass
    """)
    assert_stopped(res)
    assert_healthy(sb)


@pytest.mark.parametrize("how", ["exit(0)", "quit()", "import sys; sys.exit(0)", "raise SystemExit(0)",
                                 "import os; os._exit(0)",
                                 "import atexit, os; atexit.register(lambda: os._exit(0)); raise ValueError"])
def test_exit_before_tests_run(sb, how):
    program = f"def f(x):\n    return x\n{how}\ndef check(c):\n    assert c(1) == 1\ncheck(f)"
    res = run(sb, program)
    assert_stopped(res)
    assert res["result"] != "passed"


def test_forged_verdict_without_token(sb):
    res = run(sb, "import os\nos.write(3, b'00000000000000000000000000000000 p \\n')\nos._exit(0)")
    assert_stopped(res)


def test_memory_blowup(sb):
    for program in ("x = [0] * 10 ** 10", "x = 'a' * 10 ** 11",
                    "xs = []\nwhile True:\n    xs.append(bytearray(10 ** 7))"):
        res = run(sb, program)
        assert_stopped(res)
    assert_healthy(sb)


def test_stdout_flood(sb):
    res = run(sb, "import os\nwhile True:\n    print('spam' * 1000)\n    os.write(1, b'x' * 10000)")
    assert_stopped(res)
    assert len(res["output"]) <= sb.limits["max_output"]
    assert_healthy(sb)


@pytest.mark.parametrize("read", ["input()", "import sys; sys.stdin.read()",
                                  "import sys; [l for l in sys.stdin]",
                                  "import os; assert os.read(0, 100)"])
def test_reading_stdin(sb, read):
    res = run(sb, read)
    assert_stopped(res)


def _canary_attacks(path):
    return [f"open({path!r}, 'w').write('pwned')",
            f"open({path!r}, 'a').write('pwned')",
            f"import os; os.remove({path!r})",
            f"import os; os.rename({path!r}, {path!r} + '.moved')",
            f"import os; os.truncate({path!r}, 0)",
            f"import os; os.chmod({path!r}, 0)",
            f"import shutil; shutil.rmtree({os.path.dirname(path)!r})",
            f"import os; fd = os.open({path!r}, os.O_WRONLY | os.O_TRUNC); os.write(fd, b'pwned')",
            f"import os; os.symlink({path!r}, 'link'); open('link', 'w').write('pwned')",
            f"import os; os.chdir({os.path.dirname(path)!r}); "
            f"open({os.path.basename(path)!r}, 'w').write('x')",
            f"import pathlib; pathlib.Path({path!r}).write_text('pwned')",
            f"import os; fd = os.open({os.path.dirname(path)!r}, os.O_RDONLY); "
            f"os.open({os.path.basename(path)!r}, os.O_WRONLY | os.O_TRUNC, dir_fd=fd)",
            # relative to a directory fd: inside if read from the (deeper) cwd, outside from the fd
            f"import os; up = '../' * len(os.getcwd().strip('/').split('/')); "
            f"fd = os.open('.', os.O_RDONLY); "
            f"os.makedirs('a/' * 20); os.chdir('a/' * 20); os.remove(up + {path.lstrip('/')!r}, dir_fd=fd)"]


def _check_canary(path, mode):
    assert os.path.exists(path), "canary deleted"
    with open(path) as f:
        assert f.read() == "precious", "canary overwritten"
    assert stat.S_IMODE(os.stat(path).st_mode) == mode, "canary permissions changed"


def test_files_outside_its_directory(sb, tmp_path, open_dir):
    for directory in (str(tmp_path), open_dir):
        canary = os.path.join(directory, "canary.txt")
        with open(canary, "w") as f:
            f.write("precious")
        os.chmod(canary, 0o666)
        for attack in _canary_attacks(canary):
            res = run(sb, attack)
            assert_stopped(res)
            _check_canary(canary, 0o666)
        assert sorted(os.listdir(directory)) == ["canary.txt"]
    assert_healthy(sb)


def test_files_outside_without_the_guard_when_privileges_are_dropped():
    with Sandbox(workers=1, disable=("guard", "seccomp")) as box:
        if box.isolation["uid"] is None:
            pytest.skip("children keep our uid here (not root, or the interpreter is unreadable to nobody)")
        canary = os.path.join(tempfile.mkdtemp(), "canary.txt")  # a 0700 directory of ours
        with open(canary, "w") as f:
            f.write("precious")
        os.chmod(canary, 0o666)
        for attack in _canary_attacks(canary):
            assert_stopped(run(box, attack))
            _check_canary(canary, 0o666)
        shutil.rmtree(os.path.dirname(canary))


def _spawners(open_dir, tag=""):
    """Programs that try to leave a process behind which, one second later, writes a marker."""
    pidfile, marker = os.path.join(open_dir, f"pid{tag}"), os.path.join(open_dir, f"marker{tag}")
    late = (f"import os, time; open({pidfile!r}, 'w').write(str(os.getpid())); time.sleep(1); "
            f"open({marker!r}, 'w').write('escaped')")
    wait = (f"import os, time\nfor _ in range(80):\n    if os.path.exists({pidfile!r}):\n        break\n"
            "    time.sleep(0.01)\n")
    programs = {
        "subprocess": f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', {late!r}])\n",
        "nohup_setsid": f"import subprocess, sys\nsubprocess.Popen(['nohup', sys.executable, '-c', {late!r}], "
                        "start_new_session=True)\n",
        "os_system": f"import os, sys\nos.system(f'{{sys.executable}} -c \"{late}\" &')\n",
        "double_fork_setsid": textwrap.dedent(f"""
            import os, time
            if os.fork() == 0:
                os.setsid()
                if os.fork() == 0:
                    {late}
                    os._exit(0)
                os._exit(0)
            """),
        "multiprocessing": f"import multiprocessing, os, time\ndef late():\n    {late}\n"
                           "multiprocessing.Process(target=late).start()\n",
        "posix_spawn": f"import os, sys\nos.posix_spawn(sys.executable, [sys.executable, '-c', {late!r}], {{}})\n",
        "exec": f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {late!r}])\n",
        "pty": f"import pty, sys\npty.spawn([sys.executable, '-c', {late!r}])\n",
    }
    return pidfile, marker, {name: p + wait for name, p in programs.items()}


def _assert_nothing_escaped(pidfile, marker, wait=True):
    if os.path.exists(pidfile):  # it did start (only possible with layers off): it must be dead now
        with open(pidfile) as f:
            text = f.read()
        if text:
            assert not os.path.exists(f"/proc/{int(text)}"), "a spawned process is still running"
    if wait:
        time.sleep(1.3)
        assert not os.path.exists(marker), "a spawned process outlived the program"


def test_spawning_processes(sb, open_dir):
    pidfile, marker, programs = _spawners(open_dir)
    results = sb.run_programs([textwrap.dedent(p) for p in programs.values()], timeout=TIMEOUT)
    for name, res in zip(programs, results):
        assert res["passed"] is False, (name, res)
    assert not os.path.exists(pidfile), "a process was spawned despite the guard"
    _assert_nothing_escaped(pidfile, marker)
    assert_healthy(sb)


def test_detached_processes_are_killed_without_guard_and_seccomp(bare, open_dir):
    """The last line of defence: the worker is a subreaper and kills whatever comes back to it."""
    markers = []
    for name in ("double_fork_setsid", "nohup_setsid", "subprocess"):
        pidfile, marker, programs = _spawners(open_dir, tag=name)
        run(bare, programs[name])  # these may "pass" here: they spawn, and the spawn must not last
        if not os.path.exists(pidfile):
            assert os.geteuid() != 0, f"{name}: the test is broken, nothing was spawned"
            pytest.skip("not root: RLIMIT_NPROC stops the spawn before the reaper is needed")
        _assert_nothing_escaped(pidfile, marker, wait=False)
        markers.append(marker)
    time.sleep(1.3)
    assert not any(os.path.exists(m) for m in markers), "a spawned process outlived the program"
    assert_healthy(bare)


def test_killing_the_worker(sb):
    res = run(sb, "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nos.killpg(0, signal.SIGKILL)")
    assert_stopped(res)
    assert_healthy(sb)


@pytest.fixture
def listener():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    srv.setblocking(False)
    yield srv
    srv.close()


NET_PROGRAMS = [
    "import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=0.5)\ns.sendall(b'hi')",
    "import socket\ns = socket.socket(socket.AF_INET, socket.SOCK_STREAM)\ns.connect(('127.0.0.1', {port}))",
    "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:{port}/', timeout=0.5)",
    "import asyncio\nasyncio.run(asyncio.open_connection('127.0.0.1', {port}))",
]


def _assert_no_connection(srv):
    with pytest.raises(BlockingIOError):
        conn, _ = srv.accept()
        conn.close()


def test_network_connections(sb, listener):
    port = listener.getsockname()[1]
    for program in NET_PROGRAMS:
        res = run(sb, program.format(port=port))
        assert_stopped(res)
        _assert_no_connection(listener)


def test_network_namespace_alone(listener):
    with Sandbox(workers=1, disable=("guard", "seccomp")) as box:
        if not box.isolation["netns"]:
            pytest.skip("this machine does not allow a new network namespace")
        port = listener.getsockname()[1]
        for program in NET_PROGRAMS[:2]:
            assert_stopped(run(box, program.format(port=port)))
            _assert_no_connection(listener)


def test_seccomp_alone(listener):
    with Sandbox(workers=1, disable=("guard", "netns")) as box:
        if not box.isolation["seccomp"]:
            pytest.skip("seccomp is not available here")
        port = listener.getsockname()[1]
        assert_stopped(run(box, NET_PROGRAMS[1].format(port=port)))
        _assert_no_connection(listener)
        res = run(box, "import os\nif os.fork() == 0:\n    os._exit(0)")
        assert res["result"].startswith("failed: PermissionError"), res


def test_filling_the_disk(sb):
    before = shutil.disk_usage(sb.base).used
    for program in ("i = 0\nwhile True:\n    open(f'f{i}', 'wb').write(b'x' * 10 ** 6)\n    i += 1",
                    "with open('big', 'wb') as f:\n    while True:\n        f.write(b'x' * 10 ** 6)",
                    "import os\nos.makedirs('a/' * 50)\nwhile True:\n"
                    "    os.mkdir(str(len(os.listdir('.'))))"):
        res = run(sb, program)
        assert_stopped(res)
    assert shutil.disk_usage(sb.base).used - before < 64 << 20
    assert_healthy(sb)


def test_nothing_left_after_close():
    box = Sandbox(workers=2)
    procs, base = [w.proc for w in box.workers], box.base
    box.run_programs(["while True: pass", "import os\nos.fork()", "print(1)"], timeout=0.5)
    box.close()
    assert all(p.poll() is not None for p in procs), "a worker outlived the sandbox"
    assert not os.path.exists(base)


# ----------------------------------------------------------------------------- API and the labeler

PROBLEM = {
    "task_id": "toy/0",
    "prompt": "def add(a, b):\n    \"\"\"Return a + b.\"\"\"\n",
    "canonical_solution": "    return a + b\n",
    "test": "def check(candidate):\n"
            "    assert candidate(1, 2) == 3\n"
            "    assert candidate(0, 0) == 0\n"
            "    assert candidate(-1, 1) == 0\n"
            "    assert candidate(2, 2) == 4\n"
            "    assert candidate(5, 5) == 10\n",
    "entry_point": "add",
}


def test_check_correctness_and_check_program():
    good = check_correctness(PROBLEM, PROBLEM["canonical_solution"], timeout=TIMEOUT)
    assert good == {"task_id": "toy/0", "passed": True, "result": "passed"}
    bad = check_correctness(PROBLEM, "    return a - b\n", timeout=TIMEOUT, frac=True)
    assert bad["passed"] is False and bad["result"] == "failed: AssertionError"
    res = check_program(build_program(PROBLEM, "    return a * b\n"), timeout=TIMEOUT)
    assert res["passed"] is False


def test_fraction_of_asserts_hand_example(sb):
    # a * b: 1*2 != 3, 0*0 == 0, -1*1 != 0, 2*2 == 4, 5*5 != 10  -> 2 of 5
    res = sb.run({"toy/0": PROBLEM}, [{"task_id": "toy/0", "completion": "    return a * b\n"}],
                 timeout=TIMEOUT, frac=True, progress=False)[0]
    assert res["frac"] == pytest.approx(0.4)
    assert res["passed"] is False and res["result"] == "failed: AssertionError"
    ok = sb.run({"toy/0": PROBLEM}, [{"task_id": "toy/0", "completion": PROBLEM["canonical_solution"]}],
                timeout=TIMEOUT, frac=True, progress=False)[0]
    assert ok["frac"] == 1.0 and ok["passed"]


def test_fraction_keeps_the_verdict_of_the_unmodified_program(sb):
    # first case fails, the next one would hang: the verdict is the first failure, not "timed out"
    program = textwrap.dedent("""
        def f(x):
            while x == 2:
                pass
            return x
        def check(c):
            assert c(1) == 0
            assert c(2) == 2
            assert c(3) == 3
        check(f)""")
    plain = run(sb, program)
    counted = run(sb, program, frac=True)
    assert plain["result"] == counted["result"] == "failed: AssertionError"
    assert counted["frac"] == 0.0  # case 2 timed out: cases counted so far (0 of 3 passed)
    # a setup statement (no assert) that raises stops the count; a loop of asserts is one case
    program = textwrap.dedent("""
        def check(c):
            assert c(1) == 1
            for i in range(3):
                assert c(i) == i
            table = {}[0]
            assert c(2) == 2
        check(lambda x: x)""")
    res = run(sb, program, frac=True)
    assert res["result"] == "failed: KeyError: 0" and res["frac"] == pytest.approx(2 / 3)


def test_instrument_check_counts_statements_with_asserts():
    import ast
    tree = ast.parse("def check(c):\n    x = 1\n    assert c(x)\n    if x:\n        assert c(2)\n"
                     "    print(x)\n")
    assert instrument_check(tree) == 2
    assert instrument_check(ast.parse("def f():\n    assert 1\n")) == 0


def test_run_many_keeps_the_order_of_samples():
    problems = {"toy/0": PROBLEM}
    completions = ["    return a + b\n", "    return a - b\n", "    while True: pass\n", "    return b + a\n"]
    samples = [{"task_id": "toy/0", "completion": c, "i": i} for i, c in enumerate(completions)]
    rows = run_many(problems, samples, timeout=TIMEOUT, workers=2, progress=False)
    assert [r["i"] for r in rows] == [0, 1, 2, 3]
    assert [r["passed"] for r in rows] == [True, False, False, True]
    assert rows[2]["result"] == "timed out"
    with pytest.raises(KeyError):
        run_many(problems, [{"task_id": "nope", "completion": ""}], progress=False)


def test_identical_programs_run_once_and_share_the_verdict(sb, monkeypatch):
    import execution
    sent = []
    send = execution._Worker.send
    monkeypatch.setattr(execution._Worker, "send", lambda self, i, job: (sent.append(job["program"]), send(self, i, job))[1])
    problems = {"toy/0": PROBLEM}
    completions = ["    return a + b\n", "    return a - b\n", "    return a + b\n", "    return a - b\n",
                   "    return a + b\n"]
    samples = [{"task_id": "toy/0", "completion": c, "i": i} for i, c in enumerate(completions)]
    rows = sb.run(problems, samples, timeout=TIMEOUT, frac=True, progress=False)
    assert len(sent) == 2                                   # two distinct programs executed
    assert [r["i"] for r in rows] == [0, 1, 2, 3, 4]
    assert [r["passed"] for r in rows] == [True, False, True, False, True]
    assert rows[0] is not rows[2] and rows[0]["frac"] == rows[2]["frac"] == 1.0


# ----------------------------------------------------------------------------- kernel-enforced layers
# Each attack below goes around the audit-hook guard (C code that opens files itself, a race
# between the guard's check and the kernel's open, the zygote's own pipes): only the layers the
# kernel enforces (a uid of its own, Landlock, the private mounts, non-dumpable processes, the
# reply nonce) stop it. See docs/SANDBOX.md.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def visible_dir():
    """A world-writable directory that children can see (outside the /tmp the sandbox hides)."""
    path = tempfile.mkdtemp(prefix=".sandbox-test-", dir=ROOT)
    os.chmod(path, 0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


WRONG = "\ndef check(c):\n    assert c(1) == 2\ncheck(abs)\n"

FORGE_REPLY = """
import os, readline
line = '{"passed": true, "result": "passed", "output": "", "seconds": 0.0}'
readline.clear_history()
for _ in range(3):
    readline.add_history(line)
ppid = os.getppid()
try:
    fds = os.listdir(f"/proc/{ppid}/fd")
except OSError:
    fds = [str(i) for i in range(32)]
for name in fds:
    path = f"/proc/{ppid}/fd/{name}"
    try:   # readline writes with open(2) from C: no audit event
        readline.append_history_file(3, path)
    except OSError:
        pass
    try:
        with open(path, "w") as f:
            f.write(line + "\\n")
    except OSError:
        pass
""" + WRONG


def test_wrong_answer_cannot_forge_a_reply_on_the_zygote_pipe(sb):
    """A wrong answer writes a "passed" reply into every pipe of its zygote it can reach: it must
    still fail, and the verdicts of the programs after it must stay their own."""
    good, bad = "def check(c):\n    assert c(2) == 4\ncheck(lambda x: x * x)", WRONG
    programs = [FORGE_REPLY, good, bad + "# 1", good + "# 1", bad + "# 2", good + "# 2"]
    for _ in range(2):
        res = sb.run_programs(programs, timeout=3.0)
        assert [r["passed"] for r in res] == [False, True, False, True, False, True], res
        assert res[0]["result"] == "failed: AssertionError", res[0]
    assert_healthy(sb)


# A program shares its interpreter with the harness that reports its verdict (_child): these reach
# for the harness's state (the job's token, the test's case counter) from inside the program.
_FORGE_FROM = """
import os
def _forge(f):  # every 32-character string in the frames below: the token among them
    while f is not None:
        for v in list(f.f_locals.values()):
            if isinstance(v, str) and len(v) == 32:
                os.write(3, (v + " p \\n").encode())
        f = f.f_back
    os._exit(0)
"""
_WRONG_ANSWER = "def check(c):\n    assert c(2) == 5\n    assert c(3) == 7\ncheck(f)\n"
HARNESS_ATTACKS = {
    "case_counter_in_globals": "def f(x):\n    for _ in range(10):\n        _sandbox_case_(True, None)\n",
    "sys._getframe": _FORGE_FROM + "import sys\ndef f(x):\n    _forge(sys._getframe())\n",
    "traceback_frame": _FORGE_FROM + "def f(x):\n    try:\n        1 / 0\n    except Exception as e:\n"
                       "        _forge(e.__traceback__.tb_frame)\n",
    "generator_frame": _FORGE_FROM + "def g():\n    _forge(me.gi_frame)\n    yield\n"
                       "def f(x):\n    global me\n    me = g()\n    next(me)\n",
    "signal_handler_frame": _FORGE_FROM + "import signal, time\ndef f(x):\n"
                            "    signal.signal(signal.SIGALRM, lambda s, frame: _forge(frame))\n"
                            "    signal.setitimer(signal.ITIMER_REAL, 0.01)\n    time.sleep(1)\n",
    "second_signal_module": _FORGE_FROM + "import _imp, importlib.util, signal, time\ndef f(x):\n"
                            "    raw = _imp.create_builtin(importlib.util.find_spec('_signal'))\n"
                            "    raw.signal(signal.SIGALRM, lambda s, frame: _forge(frame))\n"
                            "    signal.setitimer(signal.ITIMER_REAL, 0.01)\n    time.sleep(1)\n",
    "sealed_function_by_introspection": _FORGE_FROM + """import signal, time
def f(x):
    todo, seen = [signal.signal.__globals__["_signal"].signal], set()
    while todo:  # every function reachable through closures and defaults from signal.signal
        fn = todo.pop()
        if id(fn) in seen:
            continue
        seen.add(id(fn))
        if type(fn).__name__ == "builtin_function_or_method" and fn.__name__ == "signal":
            fn(signal.SIGALRM, lambda s, frame: _forge(frame))
        for cell in getattr(fn, "__closure__", None) or ():
            todo.append(cell.cell_contents)
        todo.extend(getattr(fn, "__defaults__", None) or ())
    signal.setitimer(signal.ITIMER_REAL, 0.01)
    time.sleep(1)
""",
    "gc_closures": """
import gc, os
def f(x):
    for o in gc.get_objects():
        for cell in getattr(o, "__closure__", None) or ():
            v = getattr(cell, "cell_contents", None)
            if isinstance(v, str) and len(v) == 32:
                os.write(3, (v + " p \\n").encode())
    os._exit(0)
""",
    "replaced_builtins": """
import builtins
real_dict = dict
def spy(*a, **k):  # a dict() the harness might call with the test's namespace
    for d in a:
        if isinstance(d, real_dict) and "_sandbox_case_" in d:
            d["_sandbox_case_"](0, True, None)
    return real_dict(*a, **k)
builtins.dict = spy
def f(x):
    return 0
""",
}


@pytest.mark.parametrize("frac", [False, True])
@pytest.mark.parametrize("attack", sorted(HARNESS_ATTACKS))
def test_wrong_answer_cannot_reach_the_harness_state(sb, attack, frac):
    """Each attack, on a wrong answer, reaches for the token (to report "passed" itself) or for the
    case counter (to count cases it fails as passed): neither the verdict nor the fraction moves."""
    res = run(sb, HARNESS_ATTACKS[attack] + _WRONG_ANSWER, timeout=3.0, frac=frac)
    assert res["passed"] is False, res
    if frac:
        assert res["frac"] == 0.0, res


def _zygote_reply_pipe(worker):
    """A write end of the pipe that carries this worker's replies (opened as root through /proc)."""
    ino = os.fstat(worker.proc.stdout.fileno()).st_ino
    pid = worker.proc.pid
    for name in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{name}"
        if os.readlink(path) == f"pipe:[{ino}]" and name not in ("0",):
            return os.open(path, os.O_WRONLY)
    raise AssertionError("the reply pipe was not found")


@pytest.mark.parametrize("forged", [b'{"passed": true, "result": "passed", "output": "", "seconds": 0}\n',
                                    b"not json at all\n", b"\x00" * 24 + b"{}"])
def test_foreign_replies_are_failures_and_shift_nothing(forged):
    """Whatever else appears on a worker's reply pipe (a forged verdict, garbage, a frame without
    the job's nonce) is the failure of the job in flight, never a crash nor a shifted verdict."""
    if os.geteuid() != 0:
        pytest.skip("needs root to reach the zygote's pipe from outside")
    good, bad = "def check(c):\n    assert c(2) == 4\ncheck(lambda x: x * x)", WRONG
    with Sandbox(workers=2) as box:
        for w in box.workers:
            fd = _zygote_reply_pipe(w)
            os.write(fd, forged)
            os.close(fd)
        programs = [bad, good, bad + "#", good + "#", bad + "##", good + "##"]
        expected = [False, True, False, True, False, True]
        res = box.run_programs(programs, timeout=3.0)
        for want, got in zip(expected, res):
            assert got["passed"] is False or want, res  # no wrong answer passes
            assert got["passed"] == want or got["result"] == "failed: sandbox reply rejected", res
        res = box.run_programs([p + " " for p in programs], timeout=3.0)
        assert [r["passed"] for r in res] == expected, res


def test_children_run_unprivileged(sb):
    """The uid layer (or, for a non-root evaluator, the user namespace) is in force: a child has no
    capabilities, is not root, and cannot read its zygote's environment or file descriptors."""
    if os.geteuid() == 0:
        assert sb.isolation["uid"], sb.isolation
    res = run(sb, """
        import os
        print("uid", os.getuid(), os.geteuid())
        status = open("/proc/self/status").read()
        print("caps", [l.split()[1] for l in status.splitlines() if l.startswith("CapEff")][0])
        for what in ("environ", "fd", "mem"):
            try:
                p = f"/proc/{os.getppid()}/{what}"
                (os.listdir(p) if what == "fd" else open(p, "rb").read(1))
                print("read", what)
            except OSError:
                pass
    """)
    assert res["passed"], res
    out = res["output"].split()
    assert out[out.index("caps") + 1] == "0000000000000000", res["output"]
    assert "read" not in out, res["output"]
    if os.geteuid() == 0:
        uid = int(out[out.index("uid") + 1])
        assert uid != 0 and int(out[out.index("uid") + 2]) != 0, res["output"]


def test_writes_from_c_code(sb, visible_dir):
    """sqlite3, readline and shm_open open files from C (no audit event): the kernel still keeps
    every write inside the program's own directory, and no shm object outlives the run."""
    canary = os.path.join(visible_dir, "canary.txt")
    with open(canary, "w") as f:
        f.write("precious")
    os.chmod(canary, 0o666)
    tag = f"sbx-test-{os.getpid()}"
    attacks = [f"import sqlite3\nsqlite3.connect({os.path.join(visible_dir, 'new.db')!r}).execute('create table t (x)')",
               f"import sqlite3\nsqlite3.connect({canary!r}).execute('create table t (x)')",
               f"import readline\nreadline.add_history('pwned')\nreadline.write_history_file({canary!r})",
               f"import readline\nreadline.add_history('pwned')\nreadline.append_history_file(1, {canary!r})",
               f"import readline\nreadline.write_history_file({os.path.join(visible_dir, 'hist')!r})",
               f"import _posixshmem, os\nfd = _posixshmem.shm_open('/{tag}', os.O_CREAT | os.O_RDWR, 0o666)\n"
               "os.ftruncate(fd, 1 << 20)"]
    for attack in attacks:
        res = run(sb, attack + "\n" + WRONG)
        assert_stopped(res)
        _check_canary(canary, 0o666)
        assert sorted(os.listdir(visible_dir)) == ["canary.txt"], (attack, os.listdir(visible_dir))
    assert not os.path.exists(f"/dev/shm/{tag}"), "an shm object outlived the run"
    assert_healthy(sb)


def test_created_objects_are_gone_when_the_job_ends():
    """With Landlock off, what a program may put in /tmp, /dev/shm, /var/tmp (private tmpfs) is
    wiped when its job ends: the next program finds nothing, the host never sees it."""
    tag = f"sbx-left-{os.getpid()}"
    with Sandbox(workers=1, disable=("guard", "landlock")) as box:
        made = run(box, f"""
            import _posixshmem, os
            fd = _posixshmem.shm_open('/{tag}', os.O_CREAT | os.O_RDWR, 0o600)
            for d in ("/tmp", "/var/tmp"):
                try:
                    open(os.path.join(d, {tag!r}), "w").write("x")
                except OSError:
                    pass
            print(sorted(n for d in ("/dev/shm", "/var/tmp") for n in os.listdir(d)))
        """)
        assert made["passed"] and tag in made["output"], made
        later = run(box, f"""
            import os
            assert not os.path.exists('/dev/shm/{tag}') and not os.path.exists('/var/tmp/{tag}')
            assert not os.path.exists('/tmp/{tag}')
        """)
        assert later["passed"], later
    assert not os.path.exists(f"/dev/shm/{tag}") and not os.path.exists(f"/var/tmp/{tag}")


def test_tmpfs_is_bounded(sb):
    """Memory-backed files (the working directory, /tmp, /dev/shm) share one bounded tmpfs: a
    program creating symlinks and directories as fast as it can stops at the bound."""
    res = run(sb, """
        import os, time
        target, n, t0 = "x" * 4000, 0, time.time()
        try:
            while time.time() - t0 < 3.0:
                os.symlink(target, f"l{n}")
                n += 1
        except OSError as e:
            print("stopped", e.errno)
        print("made", n)
    """, timeout=5.0)
    out = res["output"].split()
    made = int(out[out.index("made") + 1])
    assert made * 4096 <= 1.25 * (64 << 20), res["output"]  # Sandbox's default tmpfs_mb: 64 MB
    assert_healthy(sb)


RACE = """
import os, sys
os.makedirs("real/x")
os.makedirs("q")
os.symlink({outside!r}, "q/x")
os.symlink("real", "p")                   # the guard resolves p/x/canary.txt inside ...
def swap(event, args):                    # ... then, before the kernel opens it, p turns into q
    if event == "open" and args[0] == "p/x/canary.txt":
        os.symlink("q", "n")
        os.rename("n", "p")
sys.addaudithook(swap)                    # (hooks run in order: the guard's check comes first)
for _ in range(3):
    try:
        with open("p/x/canary.txt", "w") as f:
            f.write("pwned")
    except OSError:
        pass
    os.symlink("real", "n")
    os.rename("n", "p")
""" + WRONG


def test_path_race_between_the_guard_and_the_kernel(sb, visible_dir):
    """The path changes between the guard's check and the kernel's open (made certain here by
    an audit hook of the program's own that runs right after the guard's): the kernel's own
    check at the open (Landlock) is what holds."""
    canary = os.path.join(visible_dir, "canary.txt")
    with open(canary, "w") as f:
        f.write("precious")
    os.chmod(canary, 0o666)
    res = run(sb, RACE.format(outside=visible_dir))
    assert_stopped(res)
    _check_canary(canary, 0o666)
    assert_healthy(sb)


LEGIT_UNDER_ALL_LAYERS = {  # what the kernel layers must leave working
    "threads": """
        import threading, queue
        from concurrent.futures import ThreadPoolExecutor
        def f(xs):
            with ThreadPoolExecutor(4) as ex:
                out = list(ex.map(lambda x: x * x, xs))
            q = queue.Queue()
            t = threading.Thread(target=lambda: q.put(sum(out)))
            t.start(); t.join()
            return q.get()
        def check(c):
            assert c(range(10)) == 285
        check(f)
    """,
    "signals_and_timers": """
        import os, signal, time
        hits = []
        signal.signal(signal.SIGALRM, lambda s, f: hits.append("alarm"))
        signal.signal(signal.SIGUSR1, lambda s, f: hits.append("usr1"))
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGUSR1)
        signal.raise_signal(signal.SIGUSR1)
        def check(c):
            assert c() == ["alarm", "usr1", "usr1"]
        check(lambda: hits)
    """,
    "stdlib_that_asks_for_its_callers_frame": """
        import collections, enum, logging, signal, typing, warnings, dataclasses
        Point = collections.namedtuple("Point", "x y")
        Color = enum.Enum("Color", "RED GREEN")
        T = typing.TypeVar("T")
        Pair = typing.NamedTuple("Pair", [("a", int), ("b", int)])
        logging.warning("a warning")
        warnings.warn("careful")
        frames = []
        signal.signal(signal.SIGUSR1, lambda s, frame: frames.append(frame))
        signal.raise_signal(signal.SIGUSR1)
        @dataclasses.dataclass
        class Box:
            v: int
        def f():
            return Point(1, 2).x + Color.GREEN.value + Pair(3, 4).b + Box(5).v
        def check(c):
            assert c() == 1 + 2 + 4 + 5
            assert frames == [None]  # a handler runs, without the interrupted frame
        check(f)
    """,
    "allocates_100mb": """
        def f(n):
            big = bytearray(100 << 20)
            xs = list(range(n))
            return len(big) + len(xs)
        def check(c):
            assert c(10 ** 6) == (100 << 20) + 10 ** 6
        check(f)
    """,
    "sqlite_and_tempfiles_inside_its_directory": """
        import sqlite3, tempfile, os
        def f():
            db = sqlite3.connect("t.db")
            db.execute("create table t (x)")
            db.executemany("insert into t values (?)", [(1,), (2,)])
            db.commit()
            with tempfile.TemporaryDirectory() as d:
                open(os.path.join(d, "a"), "w").write("x")
            return db.execute("select sum(x) from t").fetchone()[0]
        def check(c):
            assert c() == 3
        check(f)
    """,
}


@pytest.mark.parametrize("name", sorted(LEGIT_UNDER_ALL_LAYERS))
def test_legitimate_program_passes_under_all_layers(sb, name):
    res = run(sb, LEGIT_UNDER_ALL_LAYERS[name], timeout=20.0)  # (generous: a busy machine)
    assert res["passed"], res


# ----------------------------------------------------------------------------- each layer on its own (slow)

ALONE = {  # a layer -> the others turned off; each must stop its attacks by itself
    "landlock": ("guard", "seccomp", "uid", "mountns", "netns"),
    "uid": ("guard", "seccomp", "landlock"),  # (the private mounts let the uid run the interpreter)
    "mountns": ("guard", "seccomp", "uid", "landlock", "netns"),
}
ALONE["mountns_read_only"] = ALONE["mountns"]


@pytest.mark.slow
@pytest.mark.parametrize("layer", sorted(ALONE))
def test_each_kernel_layer_alone(layer, visible_dir):
    with Sandbox(workers=1, disable=ALONE[layer]) as box:
        assert box.isolation[layer.split("_")[0]], box.isolation
        if layer == "landlock":
            canary = os.path.join(visible_dir, "canary.txt")
            with open(canary, "w") as f:
                f.write("precious")
            os.chmod(canary, 0o666)
            attacks = [a for a in _canary_attacks(canary) if "chmod" not in a]  # (metadata: see mountns)
            for attack in attacks + [RACE.format(outside=visible_dir),
                                                     f"import sqlite3\nsqlite3.connect({canary!r}).execute('create table t (x)')"]:
                assert_stopped(run(box, attack + "\n" + WRONG))
                _check_canary(canary, 0o666)
            assert sorted(os.listdir(visible_dir)) == ["canary.txt"]
        elif layer == "uid":
            res = box.run_programs([FORGE_REPLY, "pass"], timeout=3.0)
            assert [r["passed"] for r in res] == [False, True], res
            res = run(box, "import os\nopen(f'/proc/{os.getppid()}/environ', 'rb').read()")
            assert res["result"].startswith(("failed: PermissionError", "failed: FileNotFoundError")), res
        elif layer == "mountns_read_only":  # a root child, no Landlock: the read-only mounts hold
            canary = os.path.join(visible_dir, "canary.txt")
            with open(canary, "w") as f:
                f.write("precious")
            os.chmod(canary, 0o666)
            for attack in _canary_attacks(canary) + [RACE.format(outside=visible_dir)]:
                assert_stopped(run(box, attack + "\n" + WRONG))
                _check_canary(canary, 0o666)
            assert run(box, "open('/dev/null', 'w').write('x')")["passed"]
        else:
            res = run(box, "import os\nn = 0\nwhile True:\n    os.symlink('x' * 4000, f'l{n}')\n    n += 1",
                      timeout=10.0)
            assert res["result"].startswith("failed: OSError: [Errno 28]"), res  # ENOSPC: the bound
        assert_healthy(box)
