"""A reader of dlib's binary serialisation, enough for its DNN model files (``*.dat``), without dlib.

The format, as dlib's ``serialize.h``, ``cuda/tensor.h`` and ``dnn/core.h`` write it:
  * an integer is a control byte (low 4 bits: how many little-endian bytes follow; bit 7: negative, signed types
    only) and then its bytes; unsigned integers mask the control byte with 0x8F, so bit 7 there is an error.
  * a float or double is two integers, ``mantissa`` (int64) and ``exponent`` (int16): value = mantissa · 2^exponent,
    with exponents 32000 / 32001 / 32002 meaning +inf / −inf / NaN (``float_details.h``).
  * a bool is the ASCII byte ``'1'`` or ``'0'``; a string is its length (unsigned) and its bytes.
  * a tensor is version 2, four dimensions (num_samples, k, nr, nc) and then raw little-endian float32 values;
    an alias_tensor (a view into a layer's ``params``) is version 1 and four dimensions, no data.
  * a network is written outermost layer first, but every layer writes its sub-network *before* its own details,
    so the file holds the chain of layer headers (versions) from the loss inwards, then the input layer, then the
    layers' details from the innermost outwards.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from fairdiff_jax.errors import FairdiffError

_SPECIAL_EXPONENTS = {32000: np.inf, 32001: -np.inf, 32002: np.nan}


class DlibFormatError(FairdiffError):
    """The bytes are not what a dlib serialised model of the expected kind holds."""


class DlibStream:
    """Sequential reader over the bytes of one dlib file; every read checks bounds and raises DlibFormatError."""

    def __init__(self, data: bytes, source: str = "dlib file") -> None:
        self.data = memoryview(data)
        self.pos = 0
        self.source = source

    def fail(self, what: str) -> DlibFormatError:
        return DlibFormatError(f"{self.source} is not a readable dlib model ({what} at byte {self.pos})")

    def _take(self, count: int) -> memoryview:
        if count < 0 or self.pos + count > len(self.data):
            raise self.fail(f"unexpected end of file reading {count} bytes")
        chunk = self.data[self.pos : self.pos + count]
        self.pos += count
        return chunk

    def int(self) -> int:
        """A signed integer (int, long, int64)."""
        control = self._take(1)[0]
        size = control & 0x0F
        if size == 0 or size > 8:
            raise self.fail(f"bad integer control byte {control:#04x}")
        value = int.from_bytes(self._take(size), "little")
        return -value if control & 0x80 else value

    def uint(self) -> int:
        """An unsigned integer (unsigned long, uint64)."""
        control = self._take(1)[0] & 0x8F
        if control == 0 or control > 8:
            raise self.fail(f"bad unsigned control byte {control:#04x}")
        return int.from_bytes(self._take(control), "little")

    def float(self) -> float:
        """A float or double (mantissa · 2^exponent)."""
        mantissa, exponent = self.int(), self.int()
        if exponent in _SPECIAL_EXPONENTS:
            return float(_SPECIAL_EXPONENTS[exponent])
        return float(np.ldexp(np.float64(mantissa), exponent))

    def bool(self) -> bool:
        byte = bytes(self._take(1))
        if byte not in (b"0", b"1"):
            raise self.fail(f"bad bool byte {byte!r}")
        return byte == b"1"

    def string(self, limit: int = 256) -> str:
        size = self.uint()
        if size > limit:
            raise self.fail(f"string of {size} bytes where a layer name was expected")
        raw = bytes(self._take(size))
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError as err:
            raise self.fail(f"non-ASCII string {raw[:20]!r}") from err

    def expect_string(self, allowed: Sequence[str]) -> str:
        at = self.pos
        name = self.string()
        if name not in allowed:
            self.pos = at
            raise self.fail(f"found '{name}' where one of {tuple(allowed)} was expected")
        return name

    def expect_int(self, allowed: Sequence[int], what: str) -> int:
        at = self.pos
        value = self.int()
        if value not in allowed:
            self.pos = at
            raise self.fail(f"{what} version {value}, expected one of {tuple(allowed)}")
        return value

    def _dims(self) -> tuple[int, int, int, int]:
        dims = tuple(self.int() for _ in range(4))
        if any(d < 0 for d in dims) or int(np.prod(dims, dtype=np.int64)) > len(self.data):
            raise self.fail(f"impossible tensor shape {dims}")
        return dims

    def tensor(self) -> np.ndarray:
        """A tensor ``[num_samples, k, nr, nc]`` of float32 (copied out of the file)."""
        self.expect_int((2,), "tensor")
        dims = self._dims()
        count = int(np.prod(dims, dtype=np.int64))
        values = np.frombuffer(self._take(4 * count), dtype="<f4").astype(np.float32)
        return values.reshape(dims)

    def alias(self) -> tuple[int, int, int, int]:
        """An alias_tensor: the shape of a view into a layer's params."""
        self.expect_int((1,), "alias_tensor")
        return self._dims()

    def done(self) -> None:
        if self.pos != len(self.data):
            raise self.fail(f"{len(self.data) - self.pos} unread bytes after the network")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """One layer of a dlib network as its type declares it (what the file must hold).

    kind: ``con``, ``affine``, ``relu``, ``max_pool``, ``avg_pool``, ``add_prev``, ``fc``, ``tag``, ``skip``.
    For ``con``: (filters, nr, nc, stride); for pools: (nr, nc, stride), nr = 0 pooling everything.
    """

    kind: str
    filters: int = 0
    size: int = 0
    stride: int = 1


def _padding(size: int, stride: int) -> int:
    return 0 if stride != 1 else size // 2  # dlib's default for con_ and the pools


def _read_con(stream: DlibStream, spec: LayerSpec) -> dict:
    version = stream.expect_string(("con_4", "con_5", "con_6"))
    params = stream.tensor().reshape(-1)
    geometry = (stream.int(), stream.int(), stream.int(), stream.int(), stream.int(), stream.int(), stream.int())
    pad = _padding(spec.size, spec.stride)
    want = (spec.filters, spec.size, spec.size, spec.stride, spec.stride, pad, pad)
    if geometry != want:
        raise stream.fail(f"convolution (filters, nr, nc, strides, paddings) = {geometry}, expected {want}")
    filter_shape, bias_shape = stream.alias(), stream.alias()
    for _ in range(4):  # learning-rate and weight-decay multipliers
        stream.float()
    use_bias = stream.bool() if version in ("con_5", "con_6") else True
    if version == "con_6":
        stream.bool()  # use_relu: a fused relu is only set by dlib's own fuse step, never in a shipped file
    count = int(np.prod(filter_shape))
    if filter_shape[0] != spec.filters or len(params) < count + (spec.filters if use_bias else 0):
        raise stream.fail(f"convolution parameters of shape {filter_shape} and size {len(params)}")
    kernel = params[:count].reshape(filter_shape)  # [out, in, nr, nc]
    bias = params[count : count + spec.filters] if use_bias else np.zeros((spec.filters,), np.float32)
    del bias_shape
    return {"kernel": kernel, "bias": bias}


def _read_affine(stream: DlibStream) -> dict:
    version = stream.expect_string(("affine_", "affine_2"))
    params = stream.tensor().reshape(-1)
    gamma, beta = stream.alias(), stream.alias()
    mode = stream.int()
    if version == "affine_2":
        stream.bool()  # disabled: only set when dlib fuses the affine into the preceding convolution
    channels = int(np.prod(gamma))
    if mode != 0 or gamma != beta or len(params) != 2 * channels:
        raise stream.fail(f"affine layer in mode {mode} with gamma {gamma}, beta {beta}, {len(params)} params")
    return {"scale": params[:channels], "bias": params[channels:]}


def _read_pool(stream: DlibStream, spec: LayerSpec, name: str) -> dict:
    stream.expect_string((name,))
    geometry = tuple(stream.int() for _ in range(6))
    pad = _padding(spec.size, spec.stride)
    want = (spec.size, spec.size, spec.stride, spec.stride, pad, pad)
    if geometry != want:
        raise stream.fail(f"{name[:-2]} (nr, nc, strides, paddings) = {geometry}, expected {want}")
    return {}


def _read_fc(stream: DlibStream, spec: LayerSpec) -> dict:
    version = stream.expect_string(("fc_2", "fc_3"))
    outputs, inputs = stream.uint(), stream.uint()
    params = stream.tensor().reshape(-1)
    weights, _ = stream.alias(), stream.alias()
    bias_mode = stream.int()
    for _ in range(4):
        stream.float()
    if version == "fc_3":
        stream.bool()
    if outputs != spec.filters or weights[:2] != (inputs, outputs) or bias_mode != 1 or len(params) != inputs * outputs:
        raise stream.fail(f"fc layer with {inputs} -> {outputs} outputs, bias mode {bias_mode}, {len(params)} params")
    return {"kernel": params.reshape(inputs, outputs)}  # output = input @ kernel


def _read_details(stream: DlibStream, spec: LayerSpec) -> dict:
    if spec.kind == "con":
        return _read_con(stream, spec)
    if spec.kind == "affine":
        return _read_affine(stream)
    if spec.kind == "relu":
        if stream.expect_string(("relu_", "relu_2")) == "relu_2":
            stream.bool()
        return {}
    if spec.kind == "max_pool":
        return _read_pool(stream, spec, "max_pool_2")
    if spec.kind == "avg_pool":
        return _read_pool(stream, spec, "avg_pool_2")
    if spec.kind == "add_prev":
        stream.expect_string(("add_prev_",))
        return {}
    if spec.kind == "fc":
        return _read_fc(stream, spec)
    raise ValueError(f"unknown layer kind {spec.kind}")


def _read_layer_state(stream: DlibStream, version: int) -> None:
    """The bookkeeping an add_layer writes after its details (setup flags and cached tensors, not needed)."""
    for _ in range(3):
        stream.bool()
    stream.tensor()  # x_grad
    stream.tensor()  # cached_output
    if version == 2:
        stream.tensor()  # params_grad


@dataclasses.dataclass(frozen=True)
class DlibNetwork:
    """What a dlib metric-learning network file holds: per-layer parameters (outermost first), the loss settings
    and the input layer's mean pixel and size."""

    layers: tuple[dict, ...]
    input_mean: tuple[float, float, float]
    input_size: tuple[int, int]
    margin: float
    distance_threshold: float


def read_metric_network(path: str, layers: Sequence[LayerSpec]) -> DlibNetwork:
    """Read a dlib ``loss_metric<... input_rgb_image_sized<N>>`` network from ``path``; ``layers`` (outermost first,
    below the loss) is the network type the file must hold. Raises a one-line DlibFormatError when it does not."""
    if not os.path.isfile(path):
        raise FairdiffError(f"dlib model file '{path}' does not exist; pass the path of the .dat file")
    with open(path, "rb") as f:
        data = f.read()
    stream = DlibStream(data, f"'{path}'")
    if data[:2] == b"BZ":
        raise stream.fail("bzip2-compressed data; decompress it first (bunzip2)")
    stream.expect_int((1,), "loss layer")
    if stream.expect_string(("loss_metric_", "loss_metric_2")) == "loss_metric_2":
        margin, threshold = stream.float(), stream.float()
    else:
        margin, threshold = 0.1, 0.75  # dlib's hard-coded values for the first metric-loss version
    versions = []
    for spec in layers[:-1]:
        if spec.kind in ("tag", "skip"):
            stream.expect_int((1,), spec.kind)
            versions.append(None)
        else:
            versions.append(stream.expect_int((1, 2), f"{spec.kind} layer"))
    # the innermost layer sits on the input layer: dlib's add_layer<LAYER, INPUT> writes the input layer itself
    first_version = stream.expect_int((2, 3), f"{layers[-1].kind} layer on the input")
    stream.expect_string(("input_rgb_image_sized",))
    mean = (stream.float(), stream.float(), stream.float())
    size = (stream.uint(), stream.uint())
    details: list[dict] = [{"kind": spec.kind} for spec in layers]
    details[-1].update(_read_details(stream, layers[-1]))
    for _ in range(3):
        stream.bool()
    for _ in range(3):  # x_grad, cached_output, grad_final
        stream.tensor()
    if first_version == 3:
        stream.int()  # sample expansion factor
    for index in reversed(range(len(layers) - 1)):
        if versions[index] is not None:
            details[index].update(_read_details(stream, layers[index]))
            _read_layer_state(stream, versions[index])
    stream.done()
    return DlibNetwork(tuple(details), mean, size, margin, threshold)
