"""Every public name imports, and is the object it claims to be.

Each package's ``__all__`` is written out here in full, with the module that defines each name:
adding, removing or moving a public name is a visible change to this file.
``thaw_agents_core`` resolves its names lazily (module ``__getattr__``); the others import them.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest

# package -> {public name: the module that defines it}
PUBLIC = {
    "thaw_agents": {
        "BRANCH_TOKEN_EVENT": "thaw_agents.fanout",
        "BranchResult": "thaw_agents.fanout",
        "ChatThaw": "thaw_agents.chat_model",
        "ForkFanout": "thaw_agents.graph",
        "ForkPool": "thaw_agents_core.pool.fork_pool",
        "PrefixHandle": "thaw_agents_core.fork.prefix",
        "branch_node": "thaw_agents.graph",
        "branch_sends": "thaw_agents.graph",
        "fanout_node": "thaw_agents.graph",
        "fork_fanout": "thaw_agents.fanout",
        "fork_fanout_sync": "thaw_agents.fanout",
        "run_branch": "thaw_agents.graph",
        "snapshot_node": "thaw_agents.graph",
    },
    "thaw_agents_core": {
        "Branch": "thaw_agents_core.fork.branches",
        "Engine": "thaw_agents_core.engine.engine",
        "EngineSpec": "thaw_agents_core.engine.spec",
        "FileStore": "thaw_agents_core.store.file",
        "ForkPool": "thaw_agents_core.pool.fork_pool",
        "GenerationOptions": "thaw_agents_core.engine.sampling",
        "PrefixHandle": "thaw_agents_core.fork.prefix",
        "RayForkPool": "thaw_agents_core.pool.ray_pool",
        "ShmStore": "thaw_agents_core.store.shm",
        "asnapshot_ids": "thaw_agents_core.fork.branches",
        "kv_transfer_config": "thaw_agents_core.connector.settings",
        "open_store": "thaw_agents_core.store.url",
        "run_branches": "thaw_agents_core.fork.branches",
        "snapshot_ids": "thaw_agents_core.fork.branches",
    },
    "thaw_kernels": {
        "KVPageSpec": "thaw_kernels.kv_pages",
        "chunk_crc32c": "thaw_kernels.crc32c",
        "chunk_crc32c_reference": "thaw_kernels.crc32c",
        "combine_chunk_crcs": "thaw_kernels.crc32c",
        "crc32c_combine": "thaw_kernels.crc32c",
        "kv_gather": "thaw_kernels.kv_blocks",
        "kv_gather_reference": "thaw_kernels.kv_blocks",
        "kv_scatter": "thaw_kernels.kv_blocks",
        "kv_scatter_reference": "thaw_kernels.kv_blocks",
        "page_spec_for": "thaw_kernels.kv_pages",
        "Segment": "thaw_kernels.prefix_segments",
        "SegmentPlan": "thaw_kernels.prefix_segments",
        "plan_segments": "thaw_kernels.prefix_segments",
        "shared_prefix_attention": "thaw_kernels.prefix_attention",
        "shared_prefix_attention_reference": "thaw_kernels.prefix_attention",
    },
}

NAMES = [(package, name) for package, names in PUBLIC.items() for name in names]


@pytest.mark.parametrize("package", list(PUBLIC))
def test_all_is_exactly_the_public_names(package: str):
    module = importlib.import_module(package)
    assert sorted(module.__all__) == sorted(PUBLIC[package])
    assert len(set(module.__all__)) == len(module.__all__), "a name is listed twice"


@pytest.mark.parametrize("package,name", NAMES)
def test_name_is_the_object_its_module_defines(package: str, name: str):
    obj = getattr(importlib.import_module(package), name)
    home = PUBLIC[package][name]
    assert obj is getattr(importlib.import_module(home), name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert obj.__module__ == home and obj.__name__ == name


@pytest.mark.parametrize("package", list(PUBLIC))
def test_star_import_binds_every_name(package: str):
    namespace: dict = {}
    exec(f"from {package} import *", namespace)
    module = importlib.import_module(package)
    public = {name: value for name, value in namespace.items() if name != "__builtins__"}
    assert sorted(public) == sorted(PUBLIC[package])
    assert all(value is getattr(module, name) for name, value in public.items())


def test_names_in_both_faces_are_one_object():
    import thaw_agents
    import thaw_agents_core

    shared = set(PUBLIC["thaw_agents"]) & set(PUBLIC["thaw_agents_core"])
    assert shared == {"ForkPool", "PrefixHandle"}
    for name in shared:
        assert getattr(thaw_agents, name) is getattr(thaw_agents_core, name)


def test_core_refuses_unknown_names():
    import thaw_agents_core

    with pytest.raises(AttributeError, match="module 'thaw_agents_core' has no attribute 'nope'"):
        thaw_agents_core.nope  # noqa: B018
    with pytest.raises(ImportError):
        exec("from thaw_agents_core import nope", {})


def test_pyproject_installs_every_package():
    """A new subpackage must be listed in pyproject.toml, or a wheel install would lack it."""
    import tomllib

    root = Path(__file__).resolve().parents[2]
    listed = set(
        tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(init.parent.relative_to(root).parts)
        for top in ("thaw_agents", "thaw_agents_core")
        for init in (root / top).rglob("__init__.py")
    } | {"thaw_kernels"}
    assert listed == found
