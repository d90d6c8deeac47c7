"""Mount settings from a TOML file and TCIAFS_* variables, beneath the command line.

Precedence: command line, then environment, then the user's file, then the system's file
(/etc/tciafs/config.toml, where a cluster's admin sets what every node shares, such as its
site cache), then the built-in default.
The settings are read off the argparse definition of `tciafs mount`: every option there is a
key of the `[mount]` table (its dest, e.g. `cache_size`) and a variable `TCIAFS_<DEST>`, with
the option's own type, so a new option is configurable without touching this module.
"""

from __future__ import annotations

import argparse
import difflib
import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ENV_PREFIX = "TCIAFS_"
CONFIG_ENV = "TCIAFS_CONFIG"
SYSTEM_CONFIG_ENV = "TCIAFS_SYSTEM_CONFIG"  # another system file, or none ("")
SYSTEM_CONFIG = Path("/etc/tciafs/config.toml")
TABLE = "mount"
# TCIAFS_* variables that are not mount settings; any other TCIAFS_* name must be one.
RESERVED_ENV = frozenset({CONFIG_ENV, SYSTEM_CONFIG_ENV})
# How this one process runs, not how TCIA is mounted: never taken from a file or variable.
NOT_SETTINGS = frozenset({"mountpoint", "foreground", "ready_fd", "config", "help"})
# Credentials have their own mechanism (`tciafs login`, --credentials-file, LoadCredential=).
SECRET_WORDS = ("password", "passwd", "token", "secret", "api_key", "apikey")
BOOL_WORDS = {"1": True, "true": True, "yes": True, "on": True,
              "0": False, "false": False, "no": False, "off": False}


class ConfigError(Exception):
    """A setting that cannot be used; the message names the key and where it came from."""


@dataclass(frozen=True)
class Setting:
    key: str  # the [mount] key and argparse dest; the variable is TCIAFS_<KEY upper-cased>
    action: argparse.Action

    @property
    def is_bool(self) -> bool:
        return self.action.nargs == 0

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.key.upper()


def settings_of(parser: argparse.ArgumentParser) -> dict[str, Setting]:
    """The configurable options of `parser` (the `tciafs mount` subparser), by key."""
    found: dict[str, Setting] = {}
    for action in parser._actions:
        if not action.option_strings or action.dest in NOT_SETTINGS or action.dest in found:
            continue
        flag = action.nargs == 0 and (isinstance(action.const, bool)
                                      or isinstance(action, argparse.BooleanOptionalAction))
        if flag or action.nargs is None:  # single values and on/off switches
            found[action.dest] = Setting(action.dest, action)
    return found


def default_config_path(env: Mapping[str, str]) -> Path:
    xdg = env.get("XDG_CONFIG_HOME")
    base = Path(xdg) if xdg else Path.home() / ".config"
    return base / "tciafs" / "config.toml"


def config_path(explicit: Path | None, env: Mapping[str, str]) -> tuple[Path, bool]:
    """The file to read, and whether it must exist: one the user named must; the default may not."""
    if explicit is not None:
        return explicit, True
    if env.get(CONFIG_ENV):
        return Path(env[CONFIG_ENV]), True
    return default_config_path(env), False


def system_config_path(env: Mapping[str, str]) -> Path | None:
    where = env.get(SYSTEM_CONFIG_ENV)
    if where is None:
        return SYSTEM_CONFIG
    return Path(where) if where else None


def load_settings(parser: argparse.ArgumentParser, env: Mapping[str, str],
                  path: Path | None, required: bool = False) -> dict[str, Any]:
    """Settings from the system's file, then the file at `path`, overridden by the
    environment, by argparse dest."""
    settings = settings_of(parser)
    values: dict[str, Any] = {}
    system = system_config_path(env)
    if system is not None and system.exists():
        values.update(_from_file(settings, system))
    if path is not None and (required or path.exists()):
        values.update(_from_file(settings, path))
    values.update(_from_env(settings, env))
    return values


def mount_setting(parser: argparse.ArgumentParser, key: str,
                  env: Mapping[str, str] | None = None) -> Any:
    """What the environment and the config file set for a `tciafs mount` option (None if
    neither does): other commands that must agree with the mount ask here, as the cache
    commands do for the cache directory."""
    env = os.environ if env is None else env
    sub = _subparser(parser, "mount")
    if sub is None:
        return None
    path, required = config_path(None, env)
    return load_settings(sub, env, path, required).get(key)


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str],
               env: Mapping[str, str] | None = None, command: str = "mount") -> argparse.Namespace:
    """`parser.parse_args(argv)` with the settings of `command` defaulted from env and file."""
    env = os.environ if env is None else env
    args = parser.parse_args(argv)  # first pass: the subcommand and --config
    sub = _subparser(parser, command)
    if sub is None or getattr(args, "command", None) != command:
        return args
    try:
        path, required = config_path(getattr(args, "config", None), env)
        sub.set_defaults(**load_settings(sub, env, path, required))
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: {exc}\n")
    return parser.parse_args(argv)  # second pass: the command line wins over the defaults


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices.get(name)
    return None


# -- the file ------------------------------------------------------------------------------

def _from_file(settings: Mapping[str, Setting], path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    for key, value in doc.items():
        _reject_secret(key, f"{path}: key '{key}'")
        if key != TABLE:
            what = "table" if isinstance(value, dict) else "key"
            hint = f"the only table is [{TABLE}]"
            if key in settings:
                hint = f"put mount settings under [{TABLE}]"
            raise ConfigError(f"{path}: unknown {what} '{key}'; {hint}")
    table = doc.get(TABLE, {})
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: '{TABLE}' must be a table ([{TABLE}])")
    return {key: _file_value(settings, path, key, value) for key, value in table.items()}


def _file_value(settings: Mapping[str, Setting], path: Path, key: str, value: object) -> Any:
    where = f"{path}: key '{key}' in [{TABLE}]"
    setting = settings.get(key)
    if setting is None:
        _reject_secret(key, where)
        raise ConfigError(f"{path}: unknown key '{key}' in [{TABLE}]"
                          f"{_suggest(key, settings)}; known keys: {', '.join(sorted(settings))}")
    if setting.is_bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {_describe(value)}")
        return value  # the key is the dest, so the boolean is the dest's value
    return _convert(setting, value, where, base=path.parent)


# -- the environment -----------------------------------------------------------------------

def _from_env(settings: Mapping[str, Setting], env: Mapping[str, str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV or not env[name]:
            continue  # an empty variable is unset (systemd's Environment=NAME= idiom)
        key = name.removeprefix(ENV_PREFIX).lower()
        setting = settings.get(key)
        if setting is None:
            _reject_secret(key, f"environment variable {name}")
            known = ", ".join(s.env_name for s in settings.values())
            raise ConfigError(f"unknown environment variable {name}"
                              f"{_suggest(key, settings, env=True)}; known: {known}")
        values[key] = _env_value(setting, env[name])
    return values


def _env_value(setting: Setting, text: str) -> Any:
    where = f"environment variable {setting.env_name}"
    if setting.is_bool:
        word = BOOL_WORDS.get(text.strip().lower())
        if word is None:
            raise ConfigError(f"{where} must be 1 or 0 (true/false, yes/no), not {text!r}")
        return word
    kind = _kind(setting.action)
    value: object = text
    if kind in (int, float):
        try:
            value = kind(text)
        except ValueError:
            raise ConfigError(f"{where} must be {_KIND_NAMES[kind]}, not {text!r}") from None
    return _convert(setting, value, where, base=None)


# -- shared --------------------------------------------------------------------------------

_KIND_NAMES = {int: "an integer", float: "a number", str: "a string", Path: "a path string"}


def _kind(action: argparse.Action) -> Any:
    return action.type or str


def _convert(setting: Setting, value: object, where: str, base: Path | None) -> Any:
    kind = _kind(setting.action)
    accepted: tuple[type, ...] = {int: (int,), float: (int, float), str: (str,),
                                  Path: (str,)}.get(kind, (str, int, float))
    if isinstance(value, bool) or not isinstance(value, accepted):
        expected = _KIND_NAMES.get(kind, "a string")
        raise ConfigError(f"{where} must be {expected}, not {_describe(value)}")
    if kind is Path:
        result: Any = Path(os.path.expanduser(str(value)))
        # A relative path in a file means next to the file, not wherever the mount was started.
        result = base / result if base is not None and not result.is_absolute() else result
    elif kind in (int, float, str):
        result = kind(value)
    else:
        try:
            result = kind(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise ConfigError(f"{where}: {exc}") from None
    choices = setting.action.choices
    if choices is not None and result not in choices:
        raise ConfigError(f"{where} must be one of {', '.join(map(str, choices))}, "
                          f"not {value!r}")
    return result


def _reject_secret(key: str, where: str) -> None:
    if any(word in key.lower() for word in SECRET_WORDS):
        raise ConfigError(f"{where}: tciafs never reads passwords, tokens or keys from the "
                          "config file or TCIAFS_* variables; use `tciafs login`, "
                          "--credentials-file or --api-key-file")


def _suggest(key: str, settings: Mapping[str, Setting], env: bool = False) -> str:
    if key.startswith("no_") and key[3:] in settings and settings[key[3:]].is_bool:
        off = f"{ENV_PREFIX}{key[3:].upper()}=0" if env else f"{key[3:]} = false"
        return f" (write {off})"
    close = difflib.get_close_matches(key, list(settings), n=1)
    if not close:
        return ""
    return f" (did you mean {settings[close[0]].env_name if env else close[0]!r}?)"


def _describe(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "a table"}
    return f"{names.get(type(value), type(value).__name__)} ({value!r})"
