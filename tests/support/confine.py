"""Run a command under the kernel-enforced restrictions of a systemd unit, without systemd.

`python confine.py UNIT -- COMMAND...` reads the unit's `[Service]` section, applies what it can
of it to this process, then executes COMMAND in its place, as systemd does between fork and
exec; every process COMMAND starts (the transcoding workers) inherits the same restrictions.

Applied, each as systemd 252 builds it (src/shared/seccomp-util.c), one seccomp filter per
directive (the kernel applies them all, the strictest answer winning):

- `SystemCallFilter=`: an allow-list expanded from the named groups by this machine's own
  `systemd-analyze syscall-filter`, `~` entries taken out; any other call kills the process
  (SIGSYS), as in systemd without `SystemCallErrorNumber=`.
- `SystemCallArchitectures=native`: the filters hold the native architecture only; a call
  through another ABI kills the process.
- `MemoryDenyWriteExecute=yes`: `mmap` writable and executable at once, `mprotect` and
  `pkey_mprotect` adding execute, `shmat` with `SHM_EXEC` fail with EPERM. The kernel's own
  `PR_SET_MDWE` (newer systemd uses it) is set too, when the kernel has it (6.3+).
- `RestrictAddressFamilies=`: `socket()` of another family fails with EAFNOSUPPORT.
- `RestrictNamespaces=yes`: `unshare`/`clone` with a namespace flag and `setns` fail with EPERM,
  `clone3` with ENOSYS (glibc then falls back to `clone`).
- `RestrictRealtime=yes`: `sched_setscheduler` to a realtime policy fails with EPERM.
- `NoNewPrivileges=yes`, `UMask=`.
- Not `User=`: the command runs as whoever runs this (root, in the tests), with the one
  difference that makes allowed (see `confine`).
- `ProtectProc=` and `ProcSubset=`: a mount namespace of its own with a fresh /proc mounted with
  `hidepid=` and `subset=` (this needs root).

Not applied (they need systemd's mount and user set-up): `ProtectSystem=`, `ProtectHome=`,
`PrivateTmp=`, `PrivateDevices=`, `ReadWritePaths=`, `User=`, the capability sets,
`LockPersonality=`, `RestrictSUIDSGID=`. Nothing here imports more than the standard library,
so that the restrictions are in place before the command loads anything.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import socket
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_CMP_EQ = 4
SCMP_CMP_GT = 6
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 1
NAMESPACE_FLAGS = {
    "mnt": 0x00020000,
    "cgroup": 0x02000000,
    "uts": 0x04000000,
    "ipc": 0x08000000,
    "user": 0x10000000,
    "pid": 0x20000000,
    "net": 0x40000000,
    "time": 0x00000080,
}
SCHED_FIFO, SCHED_RR, SCHED_IDLE = 1, 2, 5
AF_MAX = 46  # include/linux/socket.h: the number of address families the kernel knows
MS_REC, MS_PRIVATE = 0x4000, 0x40000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8


class ArgCmp(ctypes.Structure):
    """libseccomp's `struct scmp_arg_cmp`: one comparison of a system call argument."""

    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def errno_action(code: int) -> int:
    """libseccomp's SCMP_ACT_ERRNO(code)."""
    return 0x00050000 | (code & 0xFFFF)


def service_settings(unit: Path) -> dict[str, list[str]]:
    """Return every `Key=value` of the unit's [Service] section, in order, by key (keys may
    repeat; an empty value resets the list, as systemd reads it)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        if section != "Service" or "=" not in line:
            continue
        key, value = (part.strip() for part in line.split("=", 1))
        settings[key] = [*settings.get(key, []), value] if value else []
    return settings


HELPER_ENV = {
    key: value
    for key, value in os.environ.items()
    if key not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
}
"""The environment of the systemd tools run here: the notification socket is the confined
command's, not theirs. systemd 257's (Debian 13) `systemd-analyze` sends to a NOTIFY_SOCKET it
finds, and blocked on the test's socket, which nobody read yet: the agent never started."""


def syscall_group(name: str, seen: set[str] | None = None) -> set[str]:
    """Return the system calls of `name` (a group like `@system-service`, or one call), groups
    within groups expanded, as this machine's systemd defines them."""
    if not name.startswith("@"):
        return {name}
    seen = set() if seen is None else seen
    if name in seen:
        return set()
    seen.add(name)
    listing = subprocess.run(
        ["systemd-analyze", "syscall-filter", name],
        capture_output=True,
        text=True,
        check=True,
        env=HELPER_ENV,
    ).stdout
    calls: set[str] = set()
    for line in listing.splitlines()[1:]:  # the first line names the group itself
        entry = line.strip()
        if entry and not entry.startswith("#"):
            calls |= syscall_group(entry, seen)
    return calls


def allowed_syscalls(filters: list[str]) -> set[str]:
    """Return the allow-list that `SystemCallFilter=` lines make, in order: the first names what
    is allowed, each `~` line takes its calls out."""
    allowed: set[str] = set()
    for line in filters:
        deny = line.startswith("~")
        names = line.removeprefix("~").split()
        calls = set().union(*(syscall_group(n) for n in names))
        allowed = allowed - calls if deny else allowed | calls
    return allowed


class Seccomp:
    """libseccomp through ctypes: one filter context at a time, loaded into this process."""

    def __init__(self) -> None:
        name = ctypes.util.find_library("seccomp")
        if name is None:
            sys.exit("confine: libseccomp is missing (Debian package libseccomp2)")
        self.lib = ctypes.CDLL(name, use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = (ctypes.c_uint32,)
        self.lib.seccomp_rule_add_array.argtypes = (
            ctypes.c_void_p,
            ctypes.c_uint32,
            ctypes.c_int,
            ctypes.c_uint,
            ctypes.POINTER(ArgCmp),
        )
        self.lib.seccomp_load.argtypes = (ctypes.c_void_p,)
        self.lib.seccomp_release.argtypes = (ctypes.c_void_p,)
        self.lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)

    def number(self, call: str) -> int | None:
        """Return the native number of system call `call`, or None if this architecture has
        none (systemd skips those too)."""
        number: int = self.lib.seccomp_syscall_resolve_name(call.encode())
        return None if number < 0 else number

    def load(
        self, default: int, rules: Iterable[tuple[int, str, tuple[tuple[int, int, int], ...]]]
    ) -> None:
        """Load one filter: `default` for any call no rule matches; each rule is (action,
        call, comparisons), a comparison (argument, operator, datum) or with a mask
        (argument, SCMP_CMP_MASKED_EQ, mask) comparing to the mask itself."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            sys.exit("confine: seccomp_init failed")
        try:
            for action, call, comparisons in rules:
                number = self.number(call)
                if number is None:
                    continue
                array = (ArgCmp * max(len(comparisons), 1))(
                    *(
                        ArgCmp(arg, op, datum, datum)
                        if op == SCMP_CMP_MASKED_EQ
                        else ArgCmp(arg, op, datum, 0)
                        for arg, op, datum in comparisons
                    )
                )
                rc = self.lib.seccomp_rule_add_array(ctx, action, number, len(comparisons), array)
                if rc < 0:
                    sys.exit(f"confine: seccomp rule for {call}: {os.strerror(-rc)}")
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                sys.exit(f"confine: seccomp_load: {os.strerror(-rc)}")
        finally:
            self.lib.seccomp_release(ctx)


def yes(settings: dict[str, list[str]], key: str) -> bool:
    values = settings.get(key, [])
    return bool(values) and values[-1].lower() in ("yes", "true", "1", "on")


def restrict_proc(settings: dict[str, list[str]]) -> None:
    """Give this process a mount namespace with a /proc as ProtectProc= and ProcSubset= make
    it (done first: RestrictNamespaces= forbids it afterwards)."""
    options = []
    if settings.get("ProtectProc", ["default"])[-1] != "default":
        options.append(f"hidepid={settings['ProtectProc'][-1]}")
    if settings.get("ProcSubset", ["all"])[-1] == "pid":
        options.append("subset=pid")
    if not options:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(NAMESPACE_FLAGS["mnt"]) != 0:
        sys.exit(f"confine: unshare (needs root): {os.strerror(ctypes.get_errno())}")
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        sys.exit(f"confine: making / private: {os.strerror(ctypes.get_errno())}")
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if libc.mount(b"proc", b"/proc", b"proc", flags, ",".join(options).encode()) != 0:
        sys.exit(f"confine: mounting /proc: {os.strerror(ctypes.get_errno())}")


def set_mdwe() -> None:
    """Ask the kernel itself to refuse write-and-execute memory (Linux 6.3+); older kernels
    answer EINVAL and the seccomp filter alone holds."""
    libc = ctypes.CDLL(None, use_errno=True)
    refused = libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0
    if refused and ctypes.get_errno() != errno.EINVAL:
        sys.exit(f"confine: PR_SET_MDWE: {os.strerror(ctypes.get_errno())}")


def confine(settings: dict[str, list[str]]) -> None:
    """Apply the unit's restrictions listed in this module's docstring to this process."""
    filters = settings.get("SystemCallFilter")
    calls = allowed_syscalls(filters) if filters else None  # before any filter is in place
    if calls is not None and os.geteuid() == 0 and settings.get("User", ["root"])[-1] != "root":
        # Run as root here, not as the unit's User=: SQLite then gives each new journal its
        # database's owner with fchown() (it does so only for euid 0), which @privileged
        # forbids. Under the unit the agent is not root, and SQLite never calls it.
        calls.add("fchown")
    restrict_proc(settings)
    if settings.get("UMask"):
        os.umask(int(settings["UMask"][-1], 8))
    seccomp = Seccomp()  # libseccomp sets no_new_privs as it loads each filter
    if yes(settings, "NoNewPrivileges"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(38, 1, 0, 0, 0)  # PR_SET_NO_NEW_PRIVS
    if settings.get("SystemCallArchitectures", ["native"])[-1] != "native":
        sys.exit("confine: only SystemCallArchitectures=native is emulated")
    families = settings.get("RestrictAddressFamilies")
    if families:
        allowed = {getattr(socket, name) for name in " ".join(families).split()}
        refuse = errno_action(errno.EAFNOSUPPORT)
        rules = [
            (refuse, "socket", ((0, SCMP_CMP_EQ, af),)) for af in range(AF_MAX) if af not in allowed
        ]
        rules.append((refuse, "socket", ((0, SCMP_CMP_GT, AF_MAX - 1),)))
        seccomp.load(SCMP_ACT_ALLOW, rules)
    if yes(settings, "RestrictNamespaces"):
        eperm = errno_action(errno.EPERM)
        rules = [(errno_action(errno.ENOSYS), "clone3", ()), (eperm, "setns", ())]
        for flag in NAMESPACE_FLAGS.values():
            rules += [
                (eperm, call, ((0, SCMP_CMP_MASKED_EQ, flag),)) for call in ("unshare", "clone")
            ]
        seccomp.load(SCMP_ACT_ALLOW, rules)
    if yes(settings, "RestrictRealtime"):
        eperm = errno_action(errno.EPERM)
        rules = [
            (eperm, "sched_setscheduler", ((1, SCMP_CMP_EQ, policy),))
            for policy in (SCHED_FIFO, SCHED_RR)
        ]
        rules.append((eperm, "sched_setscheduler", ((1, SCMP_CMP_GT, SCHED_IDLE),)))
        seccomp.load(SCMP_ACT_ALLOW, rules)
    if yes(settings, "MemoryDenyWriteExecute"):
        eperm = errno_action(errno.EPERM)
        write_exec = PROT_WRITE | PROT_EXEC
        rules = [
            (eperm, "mmap", ((2, SCMP_CMP_MASKED_EQ, write_exec),)),
            (eperm, "mprotect", ((2, SCMP_CMP_MASKED_EQ, PROT_EXEC),)),
            (eperm, "pkey_mprotect", ((2, SCMP_CMP_MASKED_EQ, PROT_EXEC),)),
            (eperm, "shmat", ((2, SCMP_CMP_MASKED_EQ, SHM_EXEC),)),
        ]
        seccomp.load(SCMP_ACT_ALLOW, rules)
        set_mdwe()
    if calls is not None:  # last: loading the other filters needs calls this one may forbid
        seccomp.load(SCMP_ACT_KILL_PROCESS, [(SCMP_ACT_ALLOW, call, ()) for call in sorted(calls)])


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        sys.exit("usage: confine.py UNIT -- COMMAND [ARG...]")
    unit, command = Path(argv[0]), argv[2:]
    confine(service_settings(unit))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
