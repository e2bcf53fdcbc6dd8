"""Files are data, never code: the allow-list of what a stored config may instantiate, and a pickle reader
that refuses every global outside a given set.

A checkpoint is read with torch.load(weights_only=True), but the config stored inside it is later handed
to Hydra's `instantiate`, which imports and calls whatever `_target_` names. So every stored config is
checked here, as a whole and before anything is built: each `_target_` must be one the suite's own conf/
uses (or one the user allowed on the command line with `allow_targets=[...]`, a trusted input), and no
string may hold an `${...}` interpolation (a stored config is resolved data; resolvers read the
environment). The allow-list is read from the YAML files of conf/ rather than typed out a second time,
so a new choice is allowed the moment it ships and nothing else ever is: `diffusion_lab.tasks.write_json`
or `numpy.savetxt` are importable, but no conf/ file names them.
"""

from __future__ import annotations

import functools
import io
import pickle
from collections.abc import Iterable
from pathlib import Path

import yaml

from diffusion_lab import CONF_DIR
from diffusion_lab.errors import ConfigError

# Trusted extra targets from the live command line (allow_targets=[my_pkg.MyNet]); set by the CLI before any
# checkpoint is read. Never taken from a stored config: that would let a file allow itself.
_user_targets: set[str] = set()


class UnsafeFileError(ConfigError):
    """A file asked for something outside the allow-list; the message names the key and the refused target."""


@functools.cache
def conf_targets(conf_dir: Path = CONF_DIR) -> frozenset[str]:
    """Every `_target_` named anywhere in the shipped conf/ YAML files."""
    found: set[str] = set()

    def walk(node) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "_target_" and isinstance(value, str):
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in sorted(conf_dir.rglob("*.yaml")):
        walk(yaml.safe_load(path.read_text()))
    return frozenset(found)


def allow_user_targets(targets: Iterable[str] | None) -> None:
    """Targets the user allows on the command line (their own nets or data modules)."""
    _user_targets.clear()
    _user_targets.update(str(t) for t in targets or ())


# Targets that earlier versions of conf/ named: checkpoints written by them must keep loading.
LEGACY_TARGETS = frozenset({
    "lightning.pytorch.callbacks.ModelCheckpoint",  # callbacks.checkpoint before diffusion_lab.callbacks.Checkpoint
})


def allowed_targets() -> frozenset[str]:
    return conf_targets() | LEGACY_TARGETS | frozenset(_user_targets)


def check_stored_config(config, source: str) -> None:
    """Raise UnsafeFileError naming `source`, the key and the target when a stored config could run code."""
    allowed = allowed_targets()

    def walk(node, key: str) -> None:
        if isinstance(node, dict):
            for k, value in node.items():
                path = f"{key}.{k}" if key else str(k)
                if k == "_target_" and value not in allowed:
                    raise UnsafeFileError(f"{source}: refused stored config {path}={value} (not a target of the "
                                          "suite's conf/; allow your own with allow_targets=[...])")
                walk(value, path)
        elif isinstance(node, (list, tuple)):
            for i, value in enumerate(node):
                walk(value, f"{key}[{i}]")
        elif isinstance(node, str) and "${" in node:
            raise UnsafeFileError(f"{source}: refused stored config {key}={node!r} (an interpolation; stored "
                                  "configs are resolved data)")

    walk(config, "")


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, fh, allowed: frozenset[tuple[str, str]], source: str, **kwargs):
        super().__init__(fh, **kwargs)
        self.allowed, self.source = allowed, source

    def find_class(self, module: str, name: str):
        # pickle calls find_class for every global (class or function) the stream references, before any
        # call: refusing here means nothing outside the allow-list is ever imported or invoked.
        if (module, name) not in self.allowed:
            raise UnsafeFileError(f"{self.source}: refused pickle global {module}.{name} (only plain data and "
                                  "numpy arrays are allowed)")
        return super().find_class(module, name)


# What a numpy array pickles to (numpy 1.x and 2.x module names); no function here has side effects.
NUMPY_ARRAY_GLOBALS = frozenset({
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # how Python 3 writes bytes at pickle protocol 2: a pure function, no side effects
})


def restricted_pickle_load(path: Path, allowed: frozenset[tuple[str, str]] = NUMPY_ARRAY_GLOBALS,
                           **kwargs):
    """pickle.load that only resolves the `allowed` (module, name) globals (the CIFAR-10 python batches are
    pickles of dicts of bytes, lists and one uint8 array)."""
    data = Path(path).read_bytes()
    return _RestrictedUnpickler(io.BytesIO(data), allowed, str(path), **kwargs).load()
