"""``torch.save`` files read without torch: the tensors torch.load sees, and no code from the file ever runs.

Files are written with torch in the test; the reader is checked against ``torch.load(weights_only=True)``.
"""

import collections
import os
import zipfile

import ml_dtypes
import numpy as np
import pytest

from fairdiff_jax.adaptors import torch_pickle
from fairdiff_jax.errors import FairdiffError

torch = pytest.importorskip("torch", reason="writing .pth files needs the torch extra: pip install -e '.[torch]'")
pytestmark = pytest.mark.torch


class _RunsCode:
    """An object whose unpickling calls ``os.system`` (what a malicious .pth file holds)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _numpy(tensor):
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return tensor.detach().numpy()


@pytest.mark.parametrize("protocol", [2, 4])
def test_reads_what_torch_load_reads(tmp_path, protocol):
    base = torch.randn(6, 5)
    state = collections.OrderedDict(
        f32=torch.randn(3, 4),
        f16=torch.randn(2, 3).half(),
        bf16=torch.randn(4, 2).bfloat16(),
        f64=torch.randn(2).double(),
        int64=torch.arange(7),
        boolean=torch.tensor([True, False, True]),
        transposed=base.t(),  # non-contiguous: strides (1, 5)
        row_slice=base[2:4],  # shares base's storage at an offset
        column=base[:, 3],
        scalar=torch.tensor(2.5),
        param=torch.nn.Parameter(torch.randn(3)),
        expanded=torch.arange(4).expand(3, -1),  # stride 0
    )
    path = tmp_path / "state.pth"
    torch.save(state, path, pickle_protocol=protocol)
    # torch's own weights-only reader has no protocol-4 opcodes; this file is ours, so plain torch.load is safe
    reference = torch.load(path, weights_only=protocol == 2)
    ours = torch_pickle.load_torch_state_dict(str(path))
    assert list(ours) == list(reference)
    for name, tensor in reference.items():
        expected = _numpy(tensor)
        assert ours[name].dtype == expected.dtype, name
        assert ours[name].shape == expected.shape, name
        assert ours[name].tobytes() == np.ascontiguousarray(expected).tobytes(), name


def test_reads_a_module_state_dict_with_metadata(tmp_path):
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    path = tmp_path / "module.pth"
    torch.save(module.state_dict(), path)  # an OrderedDict carrying _metadata (pickled with BUILD)
    ours = torch_pickle.load_torch_state_dict(str(path))
    assert sorted(ours) == sorted(module.state_dict())
    np.testing.assert_array_equal(ours["0.weight"], module.state_dict()["0.weight"].numpy())


@pytest.mark.parametrize("protocol", [2, 4])
def test_refuses_a_global_that_runs_code_before_executing_anything(tmp_path, monkeypatch, protocol):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(3), "payload": _RunsCode(marker)}, path, pickle_protocol=protocol)
    read = []
    monkeypatch.setattr(torch_pickle, "_read_storage", lambda *a: read.append(a) or np.zeros(3, np.float32))
    with pytest.raises(FairdiffError) as err:
        torch_pickle.load_torch_file(str(path))
    message = str(err.value)
    assert "\n" not in message and "system" in message and "refusing" in message
    assert not marker.exists()
    assert read == []  # refused from the opcode scan: not even the tensor before the payload was rebuilt


def test_the_unpickler_refuses_a_global_the_scan_did_not_see(tmp_path):
    """The restricted find_class holds on its own (the scan is a second, earlier guard)."""
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.pth"
    torch.save({"payload": _RunsCode(marker)}, path)
    with zipfile.ZipFile(path) as archive:
        root = torch_pickle._pickle_root(archive, str(path))
        data = archive.read(f"{root}/data.pkl")
        unpickler = torch_pickle._RestrictedUnpickler(data, archive, root, "little", str(path))
        with pytest.raises(FairdiffError, match="system"):
            unpickler.load()
    assert not marker.exists()


def test_refuses_other_formats_in_one_line(tmp_path):
    legacy = tmp_path / "legacy.pth"
    torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    not_torch = tmp_path / "other.zip"
    with zipfile.ZipFile(not_torch, "w") as archive:
        archive.writestr("readme.txt", "hello")
    for path, expected in [(legacy, "not a zip-format"), (not_torch, "not a torch.save archive")]:
        with pytest.raises(FairdiffError, match=expected) as err:
            torch_pickle.load_torch_file(str(path))
        assert "\n" not in str(err.value)
    with pytest.raises(FairdiffError, match="does not exist"):
        torch_pickle.load_torch_file(str(tmp_path / "missing.pth"))


def test_refuses_a_truncated_storage(tmp_path):
    path = tmp_path / "state.pth"
    torch.save({"w": torch.randn(100)}, path)
    broken = tmp_path / "broken.pth"
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(broken, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info)
            dst.writestr(info.filename, data[:40] if info.filename.endswith("/data/0") else data)
    with pytest.raises(FairdiffError, match="shorter than its 100 elements"):
        torch_pickle.load_torch_file(str(broken))


def test_a_non_state_dict_is_refused(tmp_path):
    path = tmp_path / "nested.pth"
    torch.save({"model": {"w": torch.zeros(2)}, "step": 3}, path)
    assert torch_pickle.load_torch_file(str(path))["step"] == 3  # plain containers load
    with pytest.raises(FairdiffError, match="not a flat state dict"):
        torch_pickle.load_torch_state_dict(str(path))
