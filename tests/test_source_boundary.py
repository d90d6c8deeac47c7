"""The source boundary: only the NBIA source imports the NBIA client, and NbiaSource
answers the Source protocol the tree and the cache use.

The import rule is checked statically (every import statement in tciafs/) and at run
time (the layers above load without the NBIA package).
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from tciafs import sources
from tciafs.sources.base import Capabilities, Source
from tciafs.sources.nbia import NbiaSource

from conftest import EmulatorProcess

PACKAGE = Path(sources.__file__).parent.parent  # tciafs/
NBIA = "tciafs.sources.nbia"
# `tciafs login` checks a password against NBIA's token endpoint: the package's public
# check_login() is its door in; `--source auto` builds an NbiaSource beside IDC's; no
# module may reach the client's own modules.
MAY_IMPORT_THE_PACKAGE = {"tciafs.login", "tciafs.sources.auto.source"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module an import statement of `source` names, relative ones resolved
    (`from a import b` names a, and a.b too when b is a module of its own)."""
    here = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = here[:len(here) - node.level + 1] if node.level else []
            parent = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found.add(parent)
            found.update(name for alias in node.names
                         if is_module(name := f"{parent}.{alias.name}"))
    return found


def breaches(module: str, names: set[str]) -> list[str]:
    """The NBIA client modules, or the old client package, that `module` may not import."""
    if module == NBIA or module.startswith(NBIA + "."):
        return []
    def within(name: str, package: str) -> bool:
        return name == package or name.startswith(package + ".")

    return sorted(name for name in names
                  if within(name, "tciafs.client") or name.startswith(NBIA + ".")
                  or (name == NBIA and module not in MAY_IMPORT_THE_PACKAGE))


def test_only_the_nbia_source_imports_the_nbia_client() -> None:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = module_name(path)
        names = imported(path.read_text(), module, path.name == "__init__.py")
        if bad := breaches(module, names):
            found[module] = bad
    assert found == {}


@pytest.mark.parametrize(("module", "code", "bad"), [
    ("tciafs.tree", "from tciafs.sources.nbia.client import NbiaClient", True),
    ("tciafs.tree", "import tciafs.sources.nbia.http", True),
    ("tciafs.tree", "from tciafs.sources.nbia import NbiaSource", True),
    ("tciafs.tree", "from tciafs.sources import nbia", True),
    ("tciafs.cache", "from tciafs.client import NbiaClient", True),
    ("tciafs.sources", "from .nbia import client", True),
    ("tciafs.login", "from tciafs.sources.nbia import check_login", False),
    ("tciafs.login", "from tciafs.sources.nbia.auth import Credentials", True),
    ("tciafs.sources.nbia.source", "from .client import NbiaClient", False),
    ("tciafs.tree", "from tciafs.sources.base import Source", False),
    ("tciafs.mount", "from tciafs import sources", False),
])
def test_the_import_check_sees_each_way_in(module: str, code: str, bad: bool) -> None:
    names = imported(code, module, is_package=module == "tciafs.sources")
    assert bool(breaches(module, names)) is bad


def test_the_layers_above_load_without_the_nbia_package() -> None:
    code = ("import sys, tciafs.tree, tciafs.catalog, tciafs.cache, tciafs.manifest, "
            "tciafs.sources; "
            "print(sorted(m for m in sys.modules if m.startswith(('tciafs.sources.nbia', "
            "'tciafs.client'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def _members(protocol: type) -> list[str]:
    own = [n for n in vars(protocol) if not n.startswith("_")]
    return [*own, "__aenter__", "__aexit__"]


async def test_nbia_source_has_the_protocol_s_every_member_and_signature() -> None:
    async with NbiaSource("http://127.0.0.1:9", nlst_server=None) as source:
        for name in _members(Source):
            assert hasattr(source, name), name
            wanted = inspect.getattr_static(Source, name)
            if not callable(wanted):  # a property: its value is enough
                continue
            ours = inspect.signature(getattr(source, name)).parameters
            theirs = list(inspect.signature(wanted).parameters.values())[1:]  # no self
            assert [(p.name, p.kind) for p in ours.values()] == \
                [(p.name, p.kind) for p in theirs], name
            assert inspect.iscoroutinefunction(getattr(source, name)) == \
                inspect.iscoroutinefunction(wanted), name


async def test_the_registry_builds_nbia_by_name(emulator: EmulatorProcess) -> None:
    source = sources.build("nbia", server=emulator.url, nlst_server=emulator.nlst_url,
                           timeout=10)
    assert isinstance(source, NbiaSource)
    assert source.capabilities == Capabilities(known_sizes=False, ranges=False,
                                               series_streams=True, series_checksums=True,
                                               auth=True, instance_checksums=True)
    async with source:
        await source.start()
        lung = next(c for c in await source.collections() if c.name == "Demo-Lung CT_2024")
        series = (await source.series(lung.name))[0]
        instances = await source.instances(lung.name, series.series_uid)
        assert instances and all(i.size is None for i in instances)  # NBIA tells no sizes
        with pytest.raises(ValueError, match="byte range"):
            source.open_instance(lung.name, series.series_uid, instances[0].uid,
                                 byte_range=(0, 132))
        async with source.open_instance(lung.name, series.series_uid,
                                        instances[0].uid) as stream:
            body = b"".join([chunk async for chunk in stream.chunks()])
        assert body[128:132] == b"DICM"
        assert await source.instance_md5(lung.name, series.series_uid, instances[0].uid
                                         ) == hashlib.md5(body).hexdigest()
        facts = source.collection_facts(lung.name)
        assert facts.license_name is None and "TCIA" in (facts.archive_citation or "")


def test_an_unknown_source_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="unknown source 'dicomweb'.*nbia, idc"):
        sources.build("dicomweb")
