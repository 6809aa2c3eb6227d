"""Read ``torch.save`` files (the zip-of-pickles format) into numpy, without torch and without running code.

A ``torch.save`` file is a zip archive ``<root>/data.pkl`` (a pickle) + ``<root>/data/<key>`` (raw storage
bytes) + ``<root>/byteorder``. Unpickling normally imports and calls whatever globals the pickle names, so
a file can run arbitrary code. Here the pickle is first scanned without executing anything: every global it
names must be a tensor rebuild function, a storage type or ``collections.OrderedDict``; any other global
(``os.system``, ``builtins.eval``, a class of some package, ...) refuses the whole file in one line. Only then
is it unpickled, with those names bound to our own numpy functions (nothing is imported from the file).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import zipfile
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

from fairdiff_jax.errors import FairdiffError

# torch storage classes (as pickled: module "torch") -> numpy dtype of their elements
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
_TENSOR_FUNCTIONS = ("_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")
ALLOWED_GLOBALS = frozenset(
    [("collections", "OrderedDict")]
    + [("torch._utils", name) for name in _TENSOR_FUNCTIONS]
    + [("torch", name) for name in STORAGE_DTYPES]
)
# opcodes that reach objects without naming a global we can check (copyreg's extension registry)
_REFUSED_OPCODES = ("EXT1", "EXT2", "EXT4")
_STRING_OPCODES = ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING")


class _StorageType:
    """Stands in for ``torch.FloatStorage`` etc. inside the pickle: only names a dtype."""

    def __init__(self, name: str):
        self.name = name


def _refuse(path: str, what: str) -> FairdiffError:
    return FairdiffError(
        f"{path} refers to {what}, which is not a tensor or a plain container; refusing to load it (unpickling "
        "could run code). Only load state dicts of tensors saved with torch.save, from a source you trust."
    )


def _globals_of(pickle_bytes: bytes, path: str) -> list[tuple[str, str]]:
    """Every ``(module, name)`` the pickle would look up, found by reading its opcodes (nothing executed)."""
    found = []
    strings: list[Any] = []  # the values pushed most recently, enough to resolve STACK_GLOBAL
    memo: dict[int, Any] = {}
    try:
        for opcode, arg, _ in pickletools.genops(pickle_bytes):
            name = opcode.name
            if name in _REFUSED_OPCODES:
                raise _refuse(path, f"a copyreg extension code ({name})")
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
                found.append((module, attr))
                strings.append(None)
            elif name == "STACK_GLOBAL":
                if len(strings) < 2 or not all(isinstance(s, str) for s in strings[-2:]):
                    raise _refuse(path, "a global whose name is computed at load time (STACK_GLOBAL)")
                found.append((strings[-2], strings[-1]))
                strings.append(None)
            elif name in ("PROTO", "FRAME", "STOP"):
                continue
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = strings[-1] if strings else None
            elif name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                strings.append(memo.get(int(arg)))
            else:
                strings.append(arg if name in _STRING_OPCODES else None)
            del strings[:-2]
    except (ValueError, EOFError) as err:
        raise FairdiffError(f"{path} is not a valid torch.save file (corrupt pickle: {err}); re-download it.") from err
    return found


# a strided view may repeat storage elements (stride 0) but not blow a small storage up beyond this size
_MAX_EXPANDED_ELEMENTS = 1 << 20


def _rebuild_tensor(storage, offset, size, stride, *_ignored) -> np.ndarray:
    """``torch._utils._rebuild_tensor_v2``: a strided view of a 1-D storage, copied (bounds checked)."""
    if not isinstance(storage, np.ndarray) or storage.ndim != 1:
        raise FairdiffError("a tensor in the torch file is not backed by a storage; the file is corrupt.")
    size, stride, offset = tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset)
    if len(size) != len(stride) or offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise FairdiffError(f"invalid tensor layout size={size} stride={stride} offset={offset} in a torch file.")
    numel = int(np.prod(size, dtype=np.int64))
    if numel == 0:
        return np.zeros(size, storage.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= storage.size or (numel > storage.size and numel > _MAX_EXPANDED_ELEMENTS):
        raise FairdiffError(f"a tensor of size {size} does not fit its storage ({storage.size} elements).")
    item = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(storage[offset:], shape=size, strides=[s * item for s in stride])
    return np.array(view, copy=True)


def _rebuild_parameter(data, *_ignored) -> np.ndarray:
    """``torch._utils._rebuild_parameter[_with_state]``: a Parameter is its data here."""
    if not isinstance(data, np.ndarray):
        raise FairdiffError("a torch Parameter in the file does not wrap a tensor; the file is corrupt.")
    return data


def _read_storage(archive: zipfile.ZipFile, member: str, dtype: np.dtype, numel: int, byteorder: str, path: str):
    """``numel`` elements of ``dtype`` from an uncompressed zip member (so the read is bounded by the file)."""
    try:
        info = archive.getinfo(member)
    except KeyError:
        raise FairdiffError(f"{path} lacks the storage {member}; the file is truncated.") from None
    nbytes = int(numel) * dtype.itemsize
    if info.compress_type != zipfile.ZIP_STORED or info.file_size < nbytes or numel < 0:
        raise FairdiffError(f"{path}: storage {member} is compressed or shorter than its {numel} elements.")
    with archive.open(info) as f:
        raw = f.read(nbytes)
    if byteorder == "big" and dtype.itemsize > 1:  # swap as unsigned ints: works for bfloat16 too
        swapped = np.frombuffer(raw, dtype=f">u{dtype.itemsize}").astype(f"<u{dtype.itemsize}")
        return swapped.view(dtype)
    return np.frombuffer(raw, dtype=dtype).copy()


class _RestrictedUnpickler(pickle._Unpickler):
    """The pure-Python unpickler with only the allowed globals, bound to our functions.

    Storages are read from the zip archive; BUILD is accepted only on an OrderedDict (a module state dict's
    ``_metadata``, dropped); copyreg extension codes are refused.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, byteorder: str, path: str):
        super().__init__(io.BytesIO(data))
        self._archive, self._root, self._order, self._path = archive, root, byteorder, path
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str):
        if (module, name) not in ALLOWED_GLOBALS:
            raise _refuse(self._path, f"the global {module}.{name}")
        if module == "collections":
            return collections.OrderedDict
        if module == "torch":
            return _StorageType(name)
        return _rebuild_tensor if name == "_rebuild_tensor_v2" else _rebuild_parameter

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise _refuse(self._path, f"an object reference {pid!r:.80} that is not a tensor storage")
        _, storage_type, key, _location, numel = pid
        dtype = STORAGE_DTYPES.get(storage_type.name) if isinstance(storage_type.name, str) else None
        if dtype is None or not isinstance(numel, int):
            raise _refuse(self._path, f"a storage reference {pid!r:.80} of no known element type")
        key = str(key)
        if key not in self._storages:
            member = f"{self._root}/data/{key}"
            self._storages[key] = _read_storage(self._archive, member, np.dtype(dtype), numel, self._order, self._path)
        return self._storages[key]

    def _load_build(self):
        state = self.stack.pop()
        if not isinstance(self.stack[-1], collections.OrderedDict) or not isinstance(state, dict):
            raise _refuse(self._path, "object state (BUILD) on something other than a state dict")

    def _load_extension(self):
        raise _refuse(self._path, "a copyreg extension code")

    dispatch[pickle.BUILD[0]] = _load_build
    for _code in (pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_code[0]] = _load_extension
    del _code


def _pickle_root(archive: zipfile.ZipFile, path: str) -> str:
    roots = [n[: -len("/data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise FairdiffError(f"{path} is a zip file but not a torch.save archive (no single <name>/data.pkl).")
    return roots[0]


def load_torch_file(path: str) -> Any:
    """The object a ``torch.save`` file holds, with tensors as numpy arrays; refuses any other global."""
    if not os.path.isfile(path):
        raise FairdiffError(f"{path} does not exist; pass the .pth file to import.")
    if not zipfile.is_zipfile(path):
        raise FairdiffError(
            f"{path} is not a zip-format torch.save file (legacy pre-1.6 pickles and other formats are not read); "
            "re-save it with torch.save in torch >= 1.6."
        )
    with zipfile.ZipFile(path) as archive:
        root = _pickle_root(archive, path)
        info = archive.getinfo(f"{root}/data.pkl")
        if info.file_size > os.path.getsize(path) * 2 + (1 << 20):
            raise FairdiffError(f"{path}: its pickle claims {info.file_size} bytes; the file is corrupt.")
        data = archive.read(info)
        for module, name in _globals_of(data, path):  # refuse before anything is unpickled
            if (module, name) not in ALLOWED_GLOBALS:
                raise _refuse(path, f"the global {module}.{name}")
        names = set(archive.namelist())
        byteorder = archive.read(f"{root}/byteorder").decode().strip() if f"{root}/byteorder" in names else "little"
        if byteorder not in ("little", "big"):
            raise FairdiffError(f"{path} names an unknown byte order {byteorder!r}; the file is corrupt.")
        try:
            return _RestrictedUnpickler(data, archive, root, byteorder, path).load()
        except FairdiffError:
            raise
        except (pickle.UnpicklingError, TypeError, ValueError, EOFError, AttributeError, IndexError) as err:
            raise FairdiffError(f"{path} is not a readable torch.save file ({type(err).__name__}: {err}).") from err


def load_torch_state_dict(path: str) -> dict[str, np.ndarray]:
    """A ``torch.save``'d flat state dict ``{name: tensor}`` as ``{name: np.ndarray}`` (stored dtypes)."""
    state = load_torch_file(path)
    if not isinstance(state, Mapping):
        raise FairdiffError(f"{path} holds a {type(state).__name__}, not a state dict {{name: tensor}}.")
    bad = [str(k) for k, v in state.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
    if bad:
        raise FairdiffError(f"{path} is not a flat state dict of tensors (entries {bad[:3]}); pass a state dict.")
    return dict(state)
