"""Config file and TCIAFS_* variables beneath the command line: precedence and errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from cliutil import run_tciafs

from tciafs import cli, config

pytestmark = pytest.mark.unit


@pytest.fixture
def parser() -> argparse.ArgumentParser:
    return cli.build_parser()


@pytest.fixture
def mount_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = config._subparser(parser, "mount")
    assert sub is not None
    return sub


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def xdg(tmp_path: Path) -> dict[str, str]:
    """An environment whose default config file is tmp_path/config/tciafs/config.toml, and
    whose system file (/etc/tciafs/config.toml on a machine) is tmp_path/etc/config.toml."""
    return {"XDG_CONFIG_HOME": str(tmp_path / "config"), "HOME": str(tmp_path),
            "TCIAFS_SYSTEM_CONFIG": str(tmp_path / "etc" / "config.toml")}


def default_file(xdg: dict[str, str], text: str) -> Path:
    return write(Path(xdg["XDG_CONFIG_HOME"]) / "tciafs" / "config.toml", text)


# -- precedence ----------------------------------------------------------------------------

def test_cli_beats_env_beats_file_beats_default(parser, xdg) -> None:
    default_file(xdg, """
[mount]
cache_size = "1G"
server = "http://file.example"
timeout = 10
api = "v2"
listing_ttl = 60
""")
    env = {**xdg, "TCIAFS_CACHE_SIZE": "2G", "TCIAFS_SERVER": "http://env.example",
           "TCIAFS_MAX_CONNECTIONS": "3"}
    args = config.parse_args(parser, ["mount", "/mnt/tcia", "--cache-size", "3G"], env)
    assert args.cache_size == 3 << 30  # command line over env and file
    assert args.server == "http://env.example"  # env over file
    assert args.max_connections == 3  # env over default
    assert args.timeout == 10.0 and args.api == "v2" and args.listing_ttl == 60.0  # file
    assert args.prefetch is True and args.debug is False  # built-in defaults
    assert args.mountpoint == Path("/mnt/tcia")


def test_the_system_file_is_beneath_the_users(parser, xdg) -> None:
    """What a cluster's admin sets in /etc/tciafs reaches every node and user, unless
    their own file, environment or command line says otherwise."""
    write(Path(xdg["TCIAFS_SYSTEM_CONFIG"]), """
[mount]
site_cache = "http://cache.site:8080"
cache_size = "1G"
timeout = 300
""")
    default_file(xdg, "[mount]\ncache_size = \"2G\"\n")
    args = config.parse_args(parser, ["mount", "/mnt/tcia"], xdg)
    assert (args.site_cache, args.cache_size, args.timeout) == (
        "http://cache.site:8080", 2 << 30, 300.0)
    env = {**xdg, "TCIAFS_TIMEOUT": "60"}  # a parser of its own each: defaults stick
    assert config.parse_args(cli.build_parser(), ["mount", "/mnt/tcia"], env).timeout == 60.0
    assert config.parse_args(cli.build_parser(), ["mount", "/mnt/tcia"],
                             {**xdg, "TCIAFS_SYSTEM_CONFIG": ""}).site_cache is None


@pytest.mark.parametrize("argv, main, nlst", [
    (["--site-cache", "http://cache:8080/"], "http://cache:8080", "http://cache:8080/nlst"),
    (["--site-cache", "http://cache:8080", "--nlst-server", "http://n"], "http://cache:8080",
     "http://n"),
    (["--site-cache", "http://cache:8080", "--server", "http://s"], "http://s", None),
    (["--server", "http://s"], "http://s", None),
    ([], "https://services.cancerimagingarchive.net", "https://nlst.cancerimagingarchive.net"),
])
def test_a_site_cache_stands_for_both_servers(parser, xdg, argv, main, nlst) -> None:
    args = config.parse_args(parser, ["mount", "/mnt/tcia", *argv], xdg)
    opts = cli._mount_options(args)
    assert (opts.server, opts.nlst_server) == (main, nlst)


@pytest.mark.parametrize("argv, connections", [
    ([], 4),
    (["--site-cache", "http://cache:8080"], 1),  # singles would cross the uplink per node
    (["--site-cache", "http://cache:8080", "--series-connections", "3"], 3),
    (["--series-connections", "2"], 2),
])
def test_one_stream_per_series_behind_a_site_cache(parser, xdg, argv, connections) -> None:
    args = config.parse_args(parser, ["mount", "/mnt/tcia", *argv], xdg)
    assert cli._mount_options(args).series_connections == connections


def test_switches_follow_the_same_order(parser, xdg) -> None:
    default_file(xdg, "[mount]\nprefetch = false\ndebug = true\n")
    assert config.parse_args(parser, ["mount", "/m"], xdg).prefetch is False
    env = {**xdg, "TCIAFS_PREFETCH": "yes", "TCIAFS_DEBUG": "0"}
    args = config.parse_args(parser, ["mount", "/m"], env)
    assert args.prefetch is True and args.debug is False  # env over file
    args = config.parse_args(parser, ["mount", "/m", "--no-prefetch"], env)
    assert args.prefetch is False  # command line over env


def test_no_file_and_no_env_gives_builtin_defaults(parser, xdg) -> None:
    plain = parser.parse_args(["mount", "/m"])
    assert config.parse_args(parser, ["mount", "/m"], xdg) == plain


def test_other_commands_are_untouched(parser, xdg) -> None:
    env = {**xdg, "TCIAFS_CACHE_SISE": "1"}  # would be an error for mount
    assert config.parse_args(parser, ["umount", "/m"], env).command == "umount"


def test_file_named_by_tciafs_config(mount_parser, tmp_path) -> None:
    path = write(tmp_path / "elsewhere.toml", "[mount]\napi = \"v1\"\n")
    env = {"TCIAFS_CONFIG": str(path), "XDG_CONFIG_HOME": str(tmp_path / "none")}
    path_used, required = config.config_path(None, env)
    assert (path_used, required) == (path, True)
    assert config.load_settings(mount_parser, env, path_used, required) == {"api": "v1"}
    explicit = tmp_path / "flag.toml"  # --config wins over TCIAFS_CONFIG
    assert config.config_path(explicit, env) == (explicit, True)


def test_named_file_must_exist_default_need_not(mount_parser, tmp_path) -> None:
    missing = tmp_path / "missing.toml"
    assert config.load_settings(mount_parser, {}, missing, required=False) == {}
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load_settings(mount_parser, {}, missing, required=True)


def test_types_and_paths(mount_parser, tmp_path) -> None:
    path = write(tmp_path / "etc" / "config.toml", """
[mount]
cache_dir = "cache"
cache_size = 1073741824
timeout = 5
nlst_server = "http://nlst.example"
""")
    values = config.load_settings(mount_parser, {}, path)
    # A relative path in the file is relative to the file, not to the caller's directory.
    assert values["cache_dir"] == tmp_path / "etc" / "cache"
    assert values["cache_size"] == 1 << 30 and isinstance(values["timeout"], float)
    from_env = config.load_settings(mount_parser, {"TCIAFS_CACHE_DIR": "~/c"}, None)
    assert from_env["cache_dir"] == Path("~/c").expanduser()


def test_empty_variable_is_unset(mount_parser) -> None:
    assert config.load_settings(mount_parser, {"TCIAFS_SERVER": "", "PATH": "/bin"}, None) == {}


def test_a_new_option_is_configurable_without_changes_here(mount_parser, tmp_path) -> None:
    if "--layout" not in mount_parser._option_string_actions:
        mount_parser.add_argument("--layout", choices=["uid", "descriptive"], default="uid")
    if "--allow-other" not in mount_parser._option_string_actions:
        mount_parser.add_argument("--allow-other", action="store_true")
    path = write(tmp_path / "c.toml", "[mount]\nlayout = \"descriptive\"\nallow_other = true\n")
    assert config.load_settings(mount_parser, {}, path) == {
        "layout": "descriptive", "allow_other": True}
    with pytest.raises(config.ConfigError, match="must be one of uid, descriptive"):
        config.load_settings(mount_parser, {"TCIAFS_LAYOUT": "flat"}, None)


# -- errors --------------------------------------------------------------------------------

def test_unknown_key_names_key_and_file(mount_parser, tmp_path) -> None:
    path = write(tmp_path / "config.toml", "[mount]\ncache_sise = \"50G\"\n")
    with pytest.raises(config.ConfigError) as err:
        config.load_settings(mount_parser, {}, path)
    message = str(err.value)
    assert message.startswith(f"{path}: unknown key 'cache_sise' in [mount]")
    assert "did you mean 'cache_size'?" in message
    known = message.split("known keys: ")[1].split(", ")
    assert known == sorted(known) and {"api", "cache_dir", "cache_size"} <= set(known)


def test_unknown_key_stops_the_command(parser, xdg, capsys) -> None:
    path = default_file(xdg, "[mount]\nprefetchh = true\n")
    with pytest.raises(SystemExit) as exit_:
        config.parse_args(parser, ["mount", "/m"], xdg)
    assert exit_.value.code == 2
    assert f"{path}: unknown key 'prefetchh'" in capsys.readouterr().err


def test_unknown_variable_names_it(mount_parser) -> None:
    with pytest.raises(config.ConfigError, match=r"TCIAFS_CACHE_SISE \(did you mean "
                                                 r"'TCIAFS_CACHE_SIZE'\?\)"):
        config.load_settings(mount_parser, {"TCIAFS_CACHE_SISE": "1G"}, None)
    with pytest.raises(config.ConfigError, match="write TCIAFS_PREFETCH=0"):
        config.load_settings(mount_parser, {"TCIAFS_NO_PREFETCH": "1"}, None)
    # Not a setting, but a variable tciafs itself reads.
    assert config.load_settings(mount_parser, {"TCIAFS_CONFIG": "/x"}, None) == {}


@pytest.mark.parametrize(("toml", "words"), [
    ("max_connections = \"8\"", ["'max_connections'", "an integer", "a string"]),
    ("max_connections = 8.5", ["'max_connections'", "an integer"]),
    ("timeout = true", ["'timeout'", "a number", "a boolean"]),
    ("prefetch = \"no\"", ["'prefetch'", "true or false"]),
    ("debug = 1", ["'debug'", "true or false"]),
    ("server = 42", ["'server'", "a string"]),
    ("cache_dir = [\"/a\"]", ["'cache_dir'", "an array"]),
    ("cache_size = \"lots\"", ["'cache_size'", "not a size"]),
    ("api = \"v9\"", ["'api'", "one of v4, v2, v1, legacy"]),
])
def test_wrong_type_in_file_names_key(mount_parser, tmp_path, toml, words) -> None:
    path = write(tmp_path / "config.toml", f"[mount]\n{toml}\n")
    with pytest.raises(config.ConfigError) as err:
        config.load_settings(mount_parser, {}, path)
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize(("name", "value", "words"), [
    ("TCIAFS_MAX_CONNECTIONS", "eight", ["TCIAFS_MAX_CONNECTIONS", "an integer"]),
    ("TCIAFS_TIMEOUT", "soon", ["TCIAFS_TIMEOUT", "a number"]),
    ("TCIAFS_DEBUG", "maybe", ["TCIAFS_DEBUG", "1 or 0"]),
    ("TCIAFS_API", "v3", ["TCIAFS_API", "one of"]),
])
def test_wrong_type_in_env_names_variable(mount_parser, name, value, words) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load_settings(mount_parser, {name: value}, None)
    for word in words:
        assert word in str(err.value)


@pytest.mark.parametrize("text", [
    "[mount]\npassword = \"hunter2\"\n",
    "[mount]\ntoken = \"abc\"\n",
    "[mount]\nrefresh_token = \"abc\"\n",
    "[mount]\napi_key = \"abc\"\n",
    "password = \"hunter2\"\n",
])
def test_secrets_in_file_are_refused(mount_parser, tmp_path, text) -> None:
    path = write(tmp_path / "config.toml", text)
    with pytest.raises(config.ConfigError) as err:
        config.load_settings(mount_parser, {}, path)
    assert "tciafs login" in str(err.value) and "--credentials-file" in str(err.value)
    assert "hunter2" not in str(err.value)


@pytest.mark.parametrize("name", ["TCIAFS_PASSWORD", "TCIAFS_TOKEN", "TCIAFS_ACCESS_TOKEN"])
def test_secrets_in_env_are_refused(mount_parser, name) -> None:
    with pytest.raises(config.ConfigError) as err:
        config.load_settings(mount_parser, {name: "hunter2"}, None)
    assert name in str(err.value) and "tciafs login" in str(err.value)
    assert "hunter2" not in str(err.value)


def test_process_options_are_not_settings(mount_parser, tmp_path) -> None:
    for key in ("foreground", "ready_fd", "mountpoint"):
        path = write(tmp_path / f"{key}.toml", f"[mount]\n{key} = true\n")
        with pytest.raises(config.ConfigError, match=f"unknown key '{key}'"):
            config.load_settings(mount_parser, {}, path)


@pytest.mark.parametrize(("text", "match"), [
    ("cache_size = \"1G\"\n", "unknown key 'cache_size'; put mount settings under \\[mount\\]"),
    ("[mounts]\napi = \"v4\"\n", "unknown table 'mounts'"),
    ("mount = 3\n", "'mount' must be a table"),
    ("[mount\n", "not valid TOML"),
])
def test_file_structure_errors(mount_parser, tmp_path, text, match) -> None:
    path = write(tmp_path / "config.toml", text)
    with pytest.raises(config.ConfigError, match=match) as err:
        config.load_settings(mount_parser, {}, path)
    assert str(path) in str(err.value)


def test_cache_commands_find_the_cache_the_mount_would_use(xdg, tmp_path) -> None:
    """A cache_dir set in the config file or the environment is where `tciafs cache`
    looks too, not the XDG default; --cache-dir still wins."""
    import os

    default_file(xdg, '[mount]\ncache_dir = "big-disk/tcia"\n')
    env = {**os.environ, **xdg, "XDG_CACHE_HOME": str(tmp_path / "xdg-cache")}
    env.pop("TCIAFS_CACHE_DIR", None)

    def stats(*extra: str, **more: str) -> str:
        done = run_tciafs("cache", "stats", *extra, env={**env, **more}, timeout=60)
        assert done.returncode == 1
        return done.stderr

    from_file = Path(xdg["XDG_CONFIG_HOME"]) / "tciafs" / "big-disk" / "tcia"
    assert f"no cache at {from_file}" in stats()
    assert f"no cache at {tmp_path / 'env'}" in stats(TCIAFS_CACHE_DIR=str(tmp_path / "env"))
    assert f"no cache at {tmp_path / 'cli'}" in stats("--cache-dir", str(tmp_path / "cli"),
                                                     TCIAFS_CACHE_DIR=str(tmp_path / "env"))
    default_file(xdg, "[mount]\ncache_dir = 5\n")
    assert "cache_dir" in stats()  # a broken file is reported, not skipped
