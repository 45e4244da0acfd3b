"""Load and save models: lazy external data, atomic writes, the input never touched."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from spa.errors import SpaError

# Protobuf cannot serialize a message over 2 GiB; leave headroom for the graph itself.
_PROTO_LIMIT = 2**31 - 64 * 2**20
# Models with more weight bytes than this are large: their weights are never serialized in memory
# (the verification shares them with onnxruntime, spa.verify._skeleton) and the pruned model keeps
# them in external data. Serializing costs two copies (the proto, its bytes) and onnxruntime a
# third; external data is written one tensor at a time, and external tensors stay memory-mapped.
LARGE_BYTES = 2**30


def load(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file. External data stays on disk until a tensor is read."""
    path = Path(path)
    if not path.is_file():
        raise SpaError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise SpaError(f"{path}: empty file, not an ONNX model")
    try:
        model = ir.load(path)
    except Exception as e:  # protobuf gives no typed errors
        raise SpaError(f"{path}: not a readable ONNX model ({_first_line(e)})") from None
    _check_external_data(model, path)
    _check_versions(model, path)
    _check_structure(path)
    _check_tensors(model, path)
    return model


def _check_tensors(model: ir.Model, path: Path) -> None:
    """Every initializer's data must fit its shape (the checker does not look)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        try:
            if isinstance(tensor, ir.ExternalTensor):
                expected = tensor.nbytes
                end = (tensor.offset or 0) + (tensor.length if tensor.length is not None else expected)
                if (tensor.length is not None and tensor.length != expected) or end > Path(tensor.path).stat().st_size:
                    raise ValueError("external data does not match the shape")
            else:
                tensor.numpy()
        except Exception as e:
            raise SpaError(f"{path}: tensor '{value.name}' does not match its shape {list(tensor.shape)} ({_first_line(e)})") from None


def _check_structure(path: Path) -> None:
    """onnx's full checker on the input (the output must pass it too): a broken file gets a clear error here, not a crash
    deep in the analysis."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise SpaError(f"{path}: invalid ONNX model ({_first_line(e)})") from None
    proto = onnx.load(path, load_external_data=False)
    if not proto.graph.output:
        raise SpaError(f"{path}: the graph has no outputs")


def _check_versions(model: ir.Model, path: Path) -> None:
    """The onnx package here must know the model's IR version and default-domain opset."""
    if model.ir_version > onnx.IR_VERSION:
        raise SpaError(f"{path}: IR version {model.ir_version} is newer than this onnx supports ({onnx.IR_VERSION}); upgrade onnx")
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if opset is not None and opset > onnx.defs.onnx_opset_version():
        raise SpaError(f"{path}: opset {opset} is newer than this onnx supports ({onnx.defs.onnx_opset_version()}); upgrade onnx")
    if opset is not None and opset < 7:
        raise SpaError(f"{path}: opset {opset} is too old (spa needs 7 or newer); convert it with onnx.version_converter")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _check_external_data(model: ir.Model, path: Path) -> None:
    folder = path.resolve().parent
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        if not isinstance(tensor.location, str):  # bytes that are not UTF-8 (a corrupt file)
            raise SpaError(f"{path}: external data location {tensor.location!r} is not a valid file name")
        location = Path(tensor.location)
        if location.is_absolute() or folder not in (folder / location).resolve().parents:
            raise SpaError(f"{path}: external data location '{tensor.location}' is outside the model's folder")
        if not Path(tensor.path).is_file():
            raise SpaError(f"{path}: external data file '{tensor.location}' is missing")


def weight_bytes(model: ir.Model) -> int:
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def is_large(model: ir.Model) -> bool:
    return weight_bytes(model) > LARGE_BYTES


def save(model: ir.Model, path: str | os.PathLike, serialized: bytes | None = None, external: bool | None = None) -> None:
    """Write atomically: a temporary file in the same folder, then a rename.

    Weights go to `<name>.data` beside the model when `external` is true, or (the default) when
    the file would pass protobuf's 2 GB limit; external data is written one tensor at a time.
    `serialized`, the model already serialized (by the verification), saves doing it again.
    """
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise SpaError(f"{path}: output folder '{folder}' does not exist")
    if not os.access(folder, os.W_OK):
        raise SpaError(f"{path}: output folder '{folder}' is not writable")
    external = weight_bytes(model) > _PROTO_LIMIT if external is None else external
    data_name = path.name + ".data"
    if external:
        _check_data_target(model, folder / data_name, path)
    fd, tmp = tempfile.mkstemp(prefix=".spa-", suffix=".onnx", dir=folder)
    os.close(fd)
    tmp = Path(tmp)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; the result is an ordinary file
    tmp_data = tmp.with_name(tmp.name + ".data")
    try:
        if external:
            # The location recorded in the model must be the final data file name.
            ir.save(model, tmp, external_data=tmp_data.name)
            proto = onnx.load(tmp, load_external_data=False)
            for init in proto.graph.initializer:
                for entry in init.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            onnx.save(proto, tmp)
            os.replace(tmp_data, folder / data_name)
        elif serialized is not None:
            tmp.write_bytes(serialized)
        else:
            _inline_external_tensors(model)
            ir.save(model, tmp)
        os.replace(tmp, path)
    finally:
        for leftover in (tmp, tmp_data):
            if leftover.exists():
                leftover.unlink()


def _check_data_target(model: ir.Model, data: Path, path: Path) -> None:
    """The output's data file must not replace a file that the model's weights are still read from
    (the input's external data)."""
    target = data.resolve()
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and Path(tensor.path).resolve() == target:
            raise SpaError(f"{path}: its external data file '{data}' is the input's; choose another output name")


def _inline_external_tensors(model: ir.Model) -> None:
    # Unchanged tensors still point into the input's data file; the output must stand alone.
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)


def clone(model: ir.Model) -> ir.Model:
    """An independent copy (weights read into memory)."""
    _inline_external_tensors(model)
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))
