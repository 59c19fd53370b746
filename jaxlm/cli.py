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

`run` turns a user error (jaxlm.errors.JaxlmError) into one line on stderr,
`error: <message>`, and its exit code (2; 1 for a diverged run); any other exception is a
bug and keeps its traceback.
"""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import sys
from collections.abc import Callable, Sequence

from jaxlm import config as config_lib
from jaxlm.errors import ConfigError, JaxlmError


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


@dataclasses.dataclass
class Args:
    config: object | None            # the validated ConfigDict (commands with --config)
    workdir: pathlib.Path | None
    config_path: str | None
    flags: dict                      # the command's own flags by name
    command: str | None = None       # the subcommand, for commands that have them


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
        lines += ["  --config.FIELD=VALUE\n      set one config field (see below); applied in "
                  "order after the config file", "",
                  "config fields (declared in jaxlm/config.py; FIELD = default  [valid values]):",
                  config_lib.describe_fields()]
    return "\n".join(lines)


def parse(argv: Sequence[str], prog: str, doc: str, *, config: bool = True,
          workdir: bool = True, flags: Sequence[Flag] = (),
          commands: dict[str, Sequence[Flag]] | None = None) -> Args:
    """Parses a command line; raises ConfigError (one line) for anything wrong with it.

    config/workdir: whether the command takes --config (and the overrides) and --workdir.
    commands: subcommand name -> its flags (the first argument picks one).
    """
    argv = list(argv)
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
    config_path, workdir_value = values.pop("config", None), values.pop("workdir", None)
    cfg = None
    if config:
        cfg = config_lib.load_config(config_path)
        for field, value in overrides:
            config_lib.apply_override(cfg, field, value)
        config_lib.validate(cfg)
    return Args(config=cfg, workdir=pathlib.Path(workdir_value) if workdir else None,
                config_path=config_path, flags=values, command=command)


def _own(config: bool, workdir: bool) -> tuple[Flag, ...]:
    return (CONFIG,) * config + (WORKDIR,) * workdir


def start(cfg) -> None:
    """Joins the other processes of a multi-host job (config.distributed), if any."""
    from jaxlm import (
        distributed,  # imports JAX: only once the flags are known to be good
    )
    distributed.initialize(cfg.distributed)


def run(main: Callable[[list[str]], object], argv: Sequence[str] | None = None):
    """Calls `main(argv)` with logging set up; a user error ends the process with one line
    and its exit code instead of a traceback."""
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                        datefmt="%H:%M:%S")
    logging.getLogger("jaxlm").setLevel(logging.INFO)  # ours at INFO; libraries at WARNING
    try:
        return main(sys.argv[1:] if argv is None else list(argv))
    except JaxlmError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None


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
