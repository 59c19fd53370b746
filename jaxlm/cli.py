"""The command line of every `python -m jaxlm.*` command: one parser, one error wrapper.

An entry point is a leaf module that parses its flags here and calls one library function:

    def main(argv):
        args = cli.parse(argv, "jaxlm.train", __doc__)
        cli.start(args.config)
        return loop.train(args.config, args.workdir)

    if __name__ == "__main__":
        cli.run(main)

Flags are `--name=value` (or `--name value`). Commands that take a config read
`--config=FILE`, then apply `--config.FIELD=VALUE` overrides in order and validate the
result (jaxlm.config), before JAX starts. `--help` lists the command's flags and every
config field with its default, valid values and meaning; it needs no config file.

`JAXLM_CHECK=1` stops every command right after this: flags parsed, config validated,
nothing run (how tests/test_docs.py checks the documented commands).

`run` turns a user error (jaxlm.errors.JaxlmError) into one line on stderr,
`error: <message>`, and its exit code (2; 1 for a diverged run, 130 for Ctrl-C); an
operating-system error (no space left, permission denied, not a directory, too many open
files) into one line naming the path and what to do (exit 2; JAXLM_TRACEBACK=1 shows the
traceback); any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import pathlib
import signal
import sys
import warnings
from collections.abc import Callable, Sequence

from jaxlm import config as config_lib
from jaxlm import files, interrupt
from jaxlm.errors import ConfigError, JaxlmError, abandoned_coroutine


@dataclasses.dataclass(frozen=True)
class Flag:
    """A command's own flag. `default` None: required; `switch`: takes no value (true if
    given); `repeat`: may be given several times (the value is a list)."""
    name: str
    help: str
    default: str | None = ""
    switch: bool = False
    repeat: bool = False
    metavar: str = "VALUE"

    def form(self) -> str:
        return f"--{self.name}" if self.switch else f"--{self.name}={self.metavar}"


CONFIG = Flag("config", "config file whose get_config() returns the run's config "
              "(configs/gpt/*.py)", None, metavar="FILE")
WORKDIR = Flag("workdir", "the run's folder: checkpoints, metrics, results", None, metavar="DIR")
# A command that reads its source's saved config (config="saved") takes --config optionally.
SAVED_CONFIG = Flag("config", "config file (default: the config saved with the source, "
                    "then the --config.FIELD overrides)", "", metavar="FILE")


@dataclasses.dataclass
class Args:
    config: object | None            # the validated ConfigDict (commands with --config)
    workdir: pathlib.Path | None
    config_path: str | None
    flags: dict                      # the command's own flags by name
    command: str | None = None       # the subcommand, for commands that have them
    overrides: tuple = ()            # (field, value) of --config.FIELD=VALUE, in order

    def saved_config(self, saved: dict, where: str):
        """With config="saved" and no --config: the config a checkpoint or export saved
        (`saved`, its JSON form), with the overrides applied and validated."""
        if self.config is not None:
            return self.config
        cfg = config_lib.from_dict(saved, where)
        return with_overrides(cfg, self.overrides)


def with_overrides(cfg, overrides):
    for field, value in overrides:
        config_lib.apply_override(cfg, field, value)
    config_lib.validate(cfg)
    return cfg


def _usage(prog: str, flags: Sequence[Flag], takes_config: bool, command: str | None) -> str:
    parts = [f"python -m {prog}"] + ([command] if command else [])
    for f in flags:
        parts.append(f.form() if f.default is None else f"[{f.form()}{' ...' if f.repeat else ''}]")
    if takes_config:
        parts.append("[--config.FIELD=VALUE ...]")
    return "usage: " + " ".join(parts)


def _help(prog: str, doc: str, flags: Sequence[Flag], takes_config: bool,
          commands: dict | None) -> str:
    lines = []
    for name, cmd_flags in (commands or {None: flags}).items():
        lines.append(_usage(prog, cmd_flags, takes_config, name))
    lines += ["", (doc or "").strip(), ""]
    for name, cmd_flags in (commands or {None: flags}).items():
        lines.append(f"flags of {name}:" if name else "flags:")
        for f in cmd_flags:
            default = " (required)" if f.default is None else (f" (default {f.default!r})"
                                                               if f.default else "")
            lines.append(f"  {f.form()}\n      {f.help}{default}")
    if takes_config:
        lines += ["  --config.FIELD=VALUE\n      set one config field; applied in order after "
                  "the config file",
                  "  --help-config[=SECTION]\n      list the config fields (every one, or one "
                  f"section: {', '.join(config_lib.sections())}) with their defaults, valid "
                  "values and meaning"]
    return "\n".join(lines)


def config_help(section: str = "") -> str:
    """The config schema as --help-config[=SECTION] prints it."""
    return ("config fields (declared in jaxlm/config.py; FIELD = default  [valid values]):\n"
            + config_lib.describe_fields(section))


def parse(argv: Sequence[str], prog: str, doc: str, *, config: bool | str = True,
          workdir: bool = True, flags: Sequence[Flag] = (),
          commands: dict[str, Sequence[Flag]] | None = None) -> Args:
    """Parses a command line; raises ConfigError (one line) for anything wrong with it.

    config/workdir: whether the command takes --config (and the overrides) and --workdir;
    config="saved": --config is optional (Args.saved_config reads the source's).
    commands: subcommand name -> its flags (the first argument picks one).
    """
    argv = list(argv)
    for arg in argv:
        if arg == "--help-config" or arg.startswith("--help-config="):
            print(config_help(arg.partition("=")[2]))
            raise SystemExit(0)
    if "--help" in argv or "-h" in argv:
        print(_help(prog, doc, list(_own(config, workdir)) + list(flags), config, commands))
        raise SystemExit(0)
    command = None
    if commands is not None:
        if not argv or argv[0] not in commands:
            got = repr(argv[0]) if argv else "nothing"
            raise ConfigError(f"expected a command ({' or '.join(commands)}), got {got}; "
                              f"see python -m {prog} --help")
        command, argv = argv[0], argv[1:]
        flags = commands[command]
    known = {f.name: f for f in (*_own(config, workdir), *flags)}
    values: dict = {f.name: ([] if f.repeat else (False if f.switch else f.default))
                    for f in known.values()}
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--"):
            raise ConfigError(f"unrecognised argument {arg!r}; expected --name=value")
        name, eq, value = arg[2:].partition("=")
        flag = known.get(name)
        if not eq and not (flag and flag.switch):  # "--name value"
            if i == len(argv) or (flag is None and not name.startswith("config.")):
                raise ConfigError(f"unrecognised argument {arg!r}; expected --name=value")
            value = argv[i]
            i += 1
        if config and name.startswith("config."):
            overrides.append((name[len("config."):], value))
        elif flag is None:
            listed = ", ".join(f"--{n}" for n in known) + (", --config.<field>" if config else "")
            raise ConfigError(f"unknown flag --{name}; known: {listed}")
        elif flag.switch:
            values[name] = not eq or value.lower() in ("1", "true", "yes")
        elif flag.repeat:
            values[name].append(value)
        else:
            values[name] = value
    if any(f.default is None and values[n] in (None, []) for n, f in known.items()):
        required = [f.form() for f in known.values() if f.default is None]
        raise ConfigError(" and ".join(required) + (" are" if len(required) > 1 else " is")
                          + " required")
    for n, f in known.items():
        if f.default is None and not f.repeat and not values[n].strip():
            raise ConfigError(f"--{n}= is empty; expected {f.form()}")
    # --config/--workdir are the common flags when the command takes them; otherwise a
    # command's own flag of that name stays among its flags.
    config_path = values.pop("config", None) if config else None
    workdir_value = values.pop("workdir", None) if workdir else None
    cfg = None
    if config and config_path:
        cfg = with_overrides(config_lib.load_config(config_path), overrides)
    if os.environ.get("JAXLM_CHECK") == "1":
        _checked(prog, command, config_path, overrides)
    # a local path, or a gs:// URL (jaxlm.files), which pathlib would mangle
    return Args(config=cfg, workdir=files.path(workdir_value) if workdir else None,
                config_path=config_path, flags=values, command=command,
                overrides=tuple(overrides))


def _checked(prog: str, command: str | None, config_path: str | None, overrides) -> None:
    """JAXLM_CHECK=1: the command line parsed and its config validated; stop before any
    work (JAX not started, nothing read or written; see docs/configs.md)."""
    what = (f"config {config_path} with {len(overrides)} override(s) valid" if config_path
            else "flags valid")
    print(f"checked: python -m {prog}{' ' + command if command else ''}: {what}")
    raise SystemExit(0)


def _own(config: bool | str, workdir: bool) -> tuple[Flag, ...]:
    return ((SAVED_CONFIG if config == "saved" else CONFIG),) * bool(config) + \
        (WORKDIR,) * workdir


def start(cfg) -> None:
    """Joins the other processes of a multi-host job (config.distributed), if any."""
    from jaxlm import distributed  # imports JAX: only once the flags are known to be good
    distributed.initialize(cfg.distributed)


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None):
    """Calls `main(argv)` with logging set up; a user error ends the process with one line
    and its exit code instead of a traceback. A command (argv None: the process's own)
    first restarts itself once with huge-page malloc (`_restart_with_huge_page_malloc`)."""
    try:
        if argv is None:
            _restart_with_huge_page_malloc()  # returns in the restarted process
            # Blocked across the restart's exec: a Ctrl-C while the new interpreter started
            # (before jaxlm.interrupt was installed) comes now, inside this `try`.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGINT])
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                            datefmt="%H:%M:%S", force=True)  # whatever an import set up before
        logging.getLogger("jaxlm").setLevel(logging.INFO)  # ours at INFO; libraries at WARNING
        _quiet_library_failures()
        return main(sys.argv[1:] if argv is None else list(argv))
    except JaxlmError as e:
        _exit(str(e), e.exit_code)
    except KeyboardInterrupt:
        _exit("interrupted (Ctrl-C); checkpoints already written are intact", 130,
              at_once=argv is None)
    except OSError as e:
        if os.environ.get("JAXLM_TRACEBACK"):
            raise
        _exit(f"{os_error_message(e)} (JAXLM_TRACEBACK=1 shows where)", 2)


_HUGE_PAGES = "glibc.malloc.hugetlb=1"


def _restart_with_huge_page_malloc() -> None:
    """Re-executes this command (same process id, arguments and environment) with glibc's
    malloc tunable `glibc.malloc.hugetlb=1`, read only when a process starts, unless it is
    already set or JAXLM_HUGE_PAGES=0.

    Why: XLA:CPU allocates each step's scratch memory (600 MB for the vs_hf benchmark's
    model) afresh and glibc maps it from the kernel and unmaps it after, every step; the
    kernel then faults it in 4 KB page by page (165,000 faults, 0.35 s of system time per
    step). Transparent huge pages (2 MB) cut the faults 250-fold: the debug config trains
    with 27-45% more tokens/s on a 2-core CPU, same losses (BENCHMARKS.md, "Host memory").
    No effect off Linux/glibc or where huge pages are off; glibc before 2.35 ignores it."""
    import platform
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if (sys.platform != "linux" or not sys.executable or platform.libc_ver()[0] != "glibc"
            or os.environ.get("JAXLM_HUGE_PAGES") == "0" or "glibc.malloc.hugetlb" in tunables):
        return
    env = {**os.environ, "GLIBC_TUNABLES": f"{tunables}:{_HUGE_PAGES}" if tunables else _HUGE_PAGES}
    sys.stdout.flush()
    sys.stderr.flush()
    if interrupt.held():  # Ctrl-C during an import above: the new process would not know
        raise KeyboardInterrupt
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])  # until `run` unblocks it
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError:  # the interpreter cannot be re-executed: run on without huge pages
        return


_reported = False  # a user error was printed: the process is ending


def _exit(message: str, code: int, at_once: bool = False):
    """The one line a user error ends with; library threads that fail while the process
    shuts down (Orbax's background saves, asyncio tasks) are not printed after it.

    at_once (a command interrupted by Ctrl-C): the process ends without Python's shutdown,
    which, with XLA's threads still mid-work (say, interrupted while compiling), crashed
    now and then after the line (SIGSEGV, exit code -11 instead of 130). Checkpoints
    already written are complete either way; one being written is left unfinished, as
    after a kill, and ignored on resume."""
    global _reported
    _reported = True
    for name in ("absl", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL + 1)
    warnings.simplefilter("ignore")  # e.g. coroutines of a failed save, collected at exit
    print(f"error: {message}", file=sys.stderr, flush=True)
    if at_once:
        sys.stdout.flush()
        os._exit(code)
    raise SystemExit(code) from None


def _one_line(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


def _quiet_library_failures() -> None:
    """A failed checkpoint write is reported by jaxlm in one line (checkpoint.py); keep
    Orbax's threads from printing tracebacks around it: its log records keep their first
    line, and the callbacks TensorStore fires into Orbax's closed event loop are dropped."""
    if _one_line in logging.getLogger("absl").filters:
        return
    for name in ("absl", "asyncio"):  # Orbax's log, and its tasks that fail unobserved
        logging.getLogger(name).addFilter(_one_line)
    default = sys.unraisablehook

    def unraisable(u):
        closed_loop = isinstance(u.exc_value, RuntimeError) and "Event loop is closed" in str(u.exc_value)
        # After the one-line error: a library's exit-time cleanup failing the same way (a
        # TensorBoard writer flushing to the full disk) is not news.
        if not (closed_loop or abandoned_coroutine(u)
                or (_reported and isinstance(u.exc_value, OSError))):
            default(u)
    sys.unraisablehook = unraisable


# What to do about an operating-system error, by errno.
_ADVICE = {
    errno.ENOSPC: "free space on that disk, or point the path elsewhere",
    errno.EDQUOT: "free space within your quota, or point the path elsewhere",
    errno.EACCES: "check its permissions, or choose another path",
    errno.EPERM: "check its permissions, or choose another path",
    errno.EROFS: "the filesystem is read-only; choose another path",
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "it is a folder where a file was expected",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n 65536)",
    errno.ENFILE: "too many open files on this machine",
}


def os_error_message(e: OSError) -> str:
    """One line for an operating-system error: the path, what went wrong, what to do."""
    what = e.strerror or type(e).__name__
    where = e.filename if e.filename is not None else "a file"
    advice = _ADVICE.get(e.errno, "")
    return f"{where}: {what}" + (f"; {advice}" if advice else "")


def integer(flags: dict, name: str, minimum: int) -> int:
    """A command flag's value as an int of at least `minimum`."""
    text = flags[name]
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigError(f"--{name}={text}: expected an integer >= {minimum}")
    return value


def choice(flags: dict, name: str, allowed: Sequence[str]) -> str:
    if flags[name] not in allowed:
        raise ConfigError(f"--{name}={flags[name]}: expected {' or '.join(allowed)}")
    return flags[name]
