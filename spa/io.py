"""Load and save models: lazy external data, atomic writes, the input never touched.

The files a command reads and writes are checked together before anything is written
(`check_targets`), and everything a command writes is written or nothing is (`all_or_nothing`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import mmap
import os
import tempfile
import weakref
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from spa.errors import SpaError, describe_os_error, first_line
from spa.graph import opset_version

logger = logging.getLogger(__name__)

# Protobuf cannot serialize a message over 2 GiB; leave headroom for the graph itself.
PROTO_LIMIT = 2**31 - 64 * 2**20
# Models with more weight bytes than this are large: their weights are never serialized in memory
# (the verification shares them with onnxruntime, spa.runtime.skeleton) and the pruned model keeps
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
        raise SpaError(f"{path}: not a readable ONNX model ({first_line(e)})") from None
    _check_external_data(model, path)
    _check_versions(model, path)
    _check_structure(model, path)
    _check_tensors(model, path)
    return model


def _check_tensors(model: ir.Model, path: Path) -> None:
    """Every initializer's data must fit its shape (the checker does not look)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        try:
            if isinstance(tensor, ir.ExternalTensor):
                expected = tensor.nbytes
                end = (tensor.offset or 0) + (
                    tensor.length if tensor.length is not None else expected
                )
                if (tensor.length is not None and tensor.length != expected) or end > Path(
                    tensor.path
                ).stat().st_size:
                    raise ValueError("external data does not match the shape")
            else:
                tensor.numpy()
        except Exception as e:
            raise SpaError(
                f"{path}: tensor '{value.name}' does not match its shape {list(tensor.shape)} "
                f"({first_line(e)})"
            ) from None


def _check_structure(model: ir.Model, path: Path) -> None:
    """onnx's full checker on the input (the output must pass it too): a broken file gets a clear
    error here, not a crash deep in the analysis."""
    error = _checker_error(path)
    proto = onnx.load(path, load_external_data=False)
    if error is not None and any(g.value_info for g in _graphs(proto.graph)):
        # Exporters can leave stale intermediate shapes (jax2onnx: "Inferred shape and
        # existing shape
        # differ"); onnxruntime merges them leniently and spa infers its own, so they are dropped.
        # value_info never holds a graph's inputs or outputs: the signature stays.
        for graph in _graphs(proto.graph):
            del graph.value_info[:]
        if _checker_error(path, proto) is None:
            _drop_intermediate_types(model)
            logger.warning(
                "%s: dropped the intermediate shapes the file declares, they contradict its ops "
                "(%s)",
                path,
                error,
            )
            error = None
    if error is not None:
        raise SpaError(f"{path}: invalid ONNX model ({error})")
    if not proto.graph.output:
        raise SpaError(f"{path}: the graph has no outputs")


def _checker_error(path: Path, proto: onnx.ModelProto | None = None) -> str | None:
    """The full checker's complaint about the file at `path`, or about `proto`, an edited copy of
    its graph (whose external data locations this changes); None if it passes."""
    try:
        if proto is None and is_utf8(path):
            onnx.checker.check_model(str(path), full_check=True)
        else:  # the checker takes UTF-8 paths only
            with tempfile.TemporaryDirectory(prefix="spa-") as folder:
                checkable = _checkable(
                    proto or onnx.load(path, load_external_data=False), path, Path(folder)
                )
                onnx.checker.check_model(checkable, full_check=True)
    except Exception as e:
        return first_line(e)
    return None


def _checkable(proto: onnx.ModelProto, path: Path, folder: Path) -> str:
    """`proto` saved in `folder` for the checker, its external data files replaced by sparse
    placeholders of the same sizes (spa checks the real ones itself: _check_external_data,
    _check_tensors)."""
    placeholders: dict[str, str] = {}
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                if entry.value not in placeholders:
                    placeholders[entry.value] = f"{len(placeholders)}.data"
                    with open(folder / placeholders[entry.value], "wb") as f:
                        f.truncate((path.parent / entry.value).stat().st_size)
                entry.value = placeholders[entry.value]
    onnx.save(proto, folder / "model.onnx")
    return str(folder / "model.onnx")


def is_utf8(path: Path) -> bool:
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:  # bytes that are not UTF-8, kept as surrogates
        return False


def _graphs(graph: onnx.GraphProto):
    """The graph and its subgraphs, recursively."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _graphs(sub)


def _drop_intermediate_types(model: ir.Model) -> None:
    """Forget what the file declared about the values inside the graphs (its value_info); the
    graphs' outputs keep theirs."""
    for graph in model.graphs():
        outputs = set(graph.outputs)
        for node in graph:
            for value in node.outputs:
                if value not in outputs:
                    value.shape, value.type = None, None


def _check_versions(model: ir.Model, path: Path) -> None:
    """The onnx package here must know the model's IR version and default-domain opset."""
    if model.ir_version > onnx.IR_VERSION:
        raise SpaError(
            f"{path}: IR version {model.ir_version} is newer than this onnx supports "
            f"({onnx.IR_VERSION}); upgrade onnx"
        )
    opset = opset_version(model, default=None)
    if opset is not None and opset > onnx.defs.onnx_opset_version():
        raise SpaError(
            f"{path}: opset {opset} is newer than this onnx supports "
            f"({onnx.defs.onnx_opset_version()}); upgrade onnx"
        )
    if opset is not None and opset < 7:
        raise SpaError(
            f"{path}: opset {opset} is too old (spa needs 7 or newer); convert it with "
            "onnx.version_converter"
        )


def _check_external_data(model: ir.Model, path: Path) -> None:
    folder = path.resolve().parent
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if not isinstance(tensor, ir.ExternalTensor):
            continue
        if not isinstance(tensor.location, str):  # bytes that are not UTF-8 (a corrupt file)
            raise SpaError(
                f"{path}: external data location {tensor.location!r} is not a valid file name"
            )
        location = Path(tensor.location)
        if location.is_absolute() or folder not in (folder / location).resolve().parents:
            raise SpaError(
                f"{path}: external data location '{tensor.location}' is outside the model's folder"
            )
        if not Path(tensor.path).is_file():
            raise SpaError(f"{path}: external data file '{tensor.location}' is missing")


def model_files(path: Path) -> list[tuple[Path, str]]:
    """A model file and the external data files it references, as check_targets reads them."""
    return [(path, "the input model")] + [
        (p, "the input's external data") for p in data_files(path)
    ]


def data_files(path: Path) -> list[Path]:
    """The external data files a model references (none if it does not parse: load says why)."""
    try:
        proto = onnx.load(path, load_external_data=False)
    except Exception:
        return []
    locations = {
        e.value for t in proto.graph.initializer for e in t.external_data if e.key == "location"
    }
    # bytes: not UTF-8, load refuses it
    return [path.parent / loc for loc in sorted(loc for loc in locations if isinstance(loc, str))]


def file_bytes(path: Path) -> int:
    """The model file plus the external data files it references."""
    return path.stat().st_size + sum(p.stat().st_size for p in data_files(path) if p.is_file())


def check_output_path(source: Path | None, output: Path) -> None:
    """The pruned model and its data file (spa writes one past 2 GB) against the input's files."""
    reads = model_files(source) if source is not None else []
    check_targets(
        reads,
        [
            (output, "output"),
            (output.with_name(output.name + ".data"), "the output's external data"),
        ],
    )


def check_targets(reads: list[tuple[Path, str]], writes: list[tuple[Path, str]]) -> None:
    """Before anything is written: no file a command writes may be one it reads or another one it
    writes (the same path, or the same file through a link), and each must be a regular file in a
    folder that exists. reads, writes: (path, what it is: "the input model", "--json", ...)."""
    for i, (path, what) in enumerate(writes):
        for other, role in reads:
            if _same_file(path, other):
                raise SpaError(
                    f"{what} {path}: is {role} '{other}'; spa never writes over a file it reads, "
                    "choose another name"
                )
        for other, role in writes[:i]:
            if _same_file(path, other):
                raise SpaError(
                    f"{what} {path}: the same file as {role} {other}; give each its own name"
                )
        check_writable(path, what)


def check_writable(path: Path, what: str) -> None:
    folder = path.parent
    if not folder.is_dir():
        raise SpaError(f"{what} {path}: folder '{folder}' does not exist")
    if path.is_dir():
        raise SpaError(f"{what} {path}: is a directory; give a file name")
    # a device or a FIFO: replacing it would break the system
    if path.exists() and not path.is_file():
        raise SpaError(
            f"{what} {path}: is not a regular file (a device, FIFO or socket); spa writes regular "
            "files only"
        )
    if not os.access(folder, os.W_OK):
        raise SpaError(f"{what} {path}: folder '{folder}' is not writable")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)  # hard links and symlinks too
    except OSError:  # one does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def load_arrays(path: Path, flag: str) -> np.ndarray | dict[str, np.ndarray]:
    """A .npy array, or an .npz's arrays by name. Each header is read first: one that declares more
    data than the file holds (corrupt, or hostile: 10^10 rows) is refused before numpy allocates
    it."""
    if not path.is_file():
        raise SpaError(f"{flag} {path}: no such file")
    try:
        if not zipfile.is_zipfile(path):  # .npy (an .npz is a zip of them)
            with open(path, "rb") as f:
                _check_npy_header(f, path.stat().st_size, f"{flag} {path}")
            return np.load(path)
        with np.load(path) as data:
            for info in data.zip.infolist():
                with data.zip.open(info) as f:
                    _check_npy_header(f, info.file_size, f"{flag} {path}: array '{info.filename}'")
            return {k: data[k] for k in data.files}
    except SpaError:
        raise
    except (OSError, ValueError, EOFError) as e:
        raise SpaError(
            f"{flag} {path}: not a readable .npy or .npz file ({first_line(e)})"
        ) from None


def _check_npy_header(f, size: int, where: str) -> None:
    major, _ = np.lib.format.read_magic(f)
    read = (
        np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    )
    shape, _, dtype = read(f)
    declared = math.prod(shape) * dtype.itemsize
    if not dtype.hasobject and declared > size - f.tell():
        raise SpaError(
            f"{where}: the header declares shape {list(shape)} ({declared:,} bytes), the file "
            f"holds {size - f.tell():,}: truncated or corrupt"
        )


def weight_bytes(model: ir.Model) -> int:
    return sum(
        v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None
    )


def release_pages(values) -> None:
    """Hand the resident pages of memory-mapped weights (external data) back to the kernel's page
    cache: mapped pages count as the process's memory for as long as they stay, and a pass over
    a model touches them all. A later read maps them again from the cache. Where spa is done with
    a block of weights (a session holds its own copy, a layer is scored or refit), only the block
    in hand stays paged in."""
    advice = getattr(mmap, "MADV_DONTNEED", None)
    for value in values:
        tensor = value.const_value
        raw = getattr(tensor, "raw", None)
        if advice is None or not isinstance(tensor, ir.ExternalTensor) or raw is None:
            continue
        start = (tensor.offset or 0) // mmap.PAGESIZE * mmap.PAGESIZE
        end = min((tensor.offset or 0) + tensor.nbytes, len(raw))
        if end > start:
            raw.madvise(advice, start, end - start)


class Spill:
    """A temporary file that holds the weights spa makes for a large model (the pruned and refit
    ones) instead of memory. They come back as external tensors, memory-mapped like the input's
    weights, so that `release_pages` can hand their pages back too: the pruned copy of a 3.4 GB
    model held 2.9 GB from the surgery until it was written. Writing the output copies them file
    to file (onnx_ir's ExternalTensor.tofile: copy_file_range).

    The file is in the temporary folder (TMPDIR: where that is a RAM disk, the weights stay in
    memory there) and lives as long as the model whose weights it holds (`spilled`). Where it
    cannot be written (no room left), the weights stay in memory, as without it."""

    MIN_BYTES = 1 << 20  # smaller tensors stay in memory
    ALIGN = mmap.PAGESIZE  # each tensor on pages of its own: released without its neighbours

    def __init__(self):
        fd, name = tempfile.mkstemp(prefix="spa-", suffix=".spill")
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")
        self._end = 0
        self._failed = False
        self._owner = os.getpid()

    def hold(self, values) -> None:
        """Move the in-memory weights of `values` into the file and release every one's pages."""
        values = list(values)
        for value in values:
            tensor = value.const_value
            if tensor is None or isinstance(tensor, ir.ExternalTensor):
                continue
            if tensor.nbytes < self.MIN_BYTES or self._failed:
                continue
            array = np.ascontiguousarray(tensor.numpy())
            if array.nbytes != tensor.nbytes:  # packed types (int4, ...): numpy does not match
                continue
            offset = -(-self._end // self.ALIGN) * self.ALIGN
            try:
                self._file.seek(offset)
                self._file.write(array.reshape(-1).view(np.uint8).data)
                self._file.flush()
            except OSError as e:
                logger.warning(
                    "the pruned weights stay in memory: %s: %s", self.path, describe_os_error(e)
                )
                self._failed = True
                continue
            self._end = offset + array.nbytes
            value.const_value = ir.ExternalTensor(
                self.path.name,
                offset,
                array.nbytes,
                tensor.dtype,
                shape=tensor.shape,
                name=value.name,
                base_dir=self.path.parent,
            )
        release_pages(values)

    def remove(self) -> None:
        with contextlib.suppress(OSError):  # a write that failed fails again at the flush
            self._file.close()
        if os.getpid() == self._owner:  # not a forked child's exit
            self.path.unlink(missing_ok=True)


@contextlib.contextmanager
def spilled(model: ir.Model, outlives: bool = True):
    """A Spill for the new weights of `model` where it is large (else None), removed at the end of
    the block, or where `model` `outlives` it and the block succeeds, once `model` is collected
    or the process exits."""
    if not is_large(model):
        yield None
        return
    spill = Spill()
    try:
        yield spill
    except BaseException:
        spill.remove()
        raise
    if outlives:
        weakref.finalize(model, spill.remove)
    else:
        spill.remove()


def is_large(model: ir.Model) -> bool:
    return weight_bytes(model) > LARGE_BYTES


def save(
    model: ir.Model,
    path: str | os.PathLike,
    serialized: bytes | None = None,
    external: bool | None = None,
) -> int:
    """Write atomically (`write_file`) and return the bytes written.

    Weights go to `<name>.data` beside the model when `external` is true, or (the default) when
    the file would pass protobuf's 2 GB limit; external data is written one tensor at a time.
    `serialized`, the model already serialized (by the verification), saves doing it again.
    """
    path = Path(path)
    check_writable(path, "output")
    external = weight_bytes(model) > PROTO_LIMIT if external is None else external
    data = path.with_name(path.name + ".data")
    if external:
        _check_data_target(model, data, path)

    def write(tmp: Path) -> None:
        if external:
            # The location recorded in the model must be the final data file name.
            ir.save(model, tmp, external_data=tmp.name + ".data")
            proto = onnx.load(tmp, load_external_data=False)
            for init in proto.graph.initializer:
                for entry in init.external_data:
                    if entry.key == "location":
                        entry.value = data.name
            onnx.save(proto, tmp)
        elif serialized is not None:
            tmp.write_bytes(serialized)
        else:
            inline_external_tensors(model)
            ir.save(model, tmp)

    return write_file(path, write, data if external else None)


def load_json(path: str | os.PathLike, flag: str):
    """A JSON file a flag names, or one error line."""
    try:
        return json.loads(Path(path).read_text())
    except OSError as e:
        raise SpaError(f"{flag} {describe_os_error(e)}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise SpaError(f"{flag} {path}: not a JSON file ({first_line(e)})") from None


def write_text(path: str | os.PathLike, text: str) -> int:
    return write_file(Path(path), lambda tmp: tmp.write_text(text))


# (temporary, final) pairs written but not yet renamed, while an all_or_nothing() block is open.
_staged: list[tuple[Path, Path]] | None = None


@contextlib.contextmanager
def all_or_nothing():
    """Everything written inside the block (save, write_file) stays in temporary files until the
    block ends; then they are renamed into place together. An error or interrupt in the block, or
    a rename that fails, leaves every target as it was before."""
    global _staged
    _staged = []
    try:
        yield
        _rename(_staged)
    finally:
        _remove(_staged)
        _staged = None


def write_file(path: Path, write: Callable[[Path], None], data: Path | None = None) -> int:
    """write(tmp) fills a temporary file beside `path` (and, with `data`, the file tmp + ".data",
    which becomes `data`); once complete they replace the targets, at once or at the end of an
    all_or_nothing() block. Returns the bytes written. An error or interrupt removes them; an
    OSError names the target, not the temporary file."""
    files: list[tuple[Path, Path]] = []
    try:
        fd, name = tempfile.mkstemp(prefix=".spa-", suffix=path.suffix, dir=path.parent)
        files.append((Path(name), path))
        if data is not None:  # renamed first: the model never points at a data file not yet there
            files.insert(0, (Path(name + ".data"), data))
        os.close(fd)
        # mkstemp makes it private; the result is an ordinary file
        os.chmod(name, 0o666 & ~_umask())
        write(Path(name))
        size = sum(t.stat().st_size for t, _ in files)
    except OSError as e:
        _remove(files)
        raise OSError(e.errno, e.strerror, str(path)) from None
    except BaseException:
        _remove(files)
        raise
    if _staged is not None:
        _staged.extend(files)
    else:
        _rename(files)
    return size


def _rename(files: list[tuple[Path, Path]]) -> None:
    """Rename each temporary file onto its target. If one rename fails, the targets renamed so far
    are put back as they were: an old file is kept as a hard link until all are done (where the
    file system has no hard links, a replaced file cannot come back; a new one is removed)."""
    renamed: list[tuple[Path, bool, Path | None]] = []  # (target, it existed, its old file)
    links: list[Path] = []
    try:
        for tmp, final in files:
            existed, old = os.path.lexists(final), None
            if existed:
                with contextlib.suppress(OSError):
                    os.link(final, tmp.with_name(tmp.name + ".old"), follow_symlinks=False)
                    old = tmp.with_name(tmp.name + ".old")
                    links.append(old)
            try:
                os.replace(tmp, final)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(final)) from None
            renamed.append((final, existed, old))
    except BaseException:
        for final, existed, old in reversed(renamed):
            if old is not None:
                os.replace(old, final)
            elif not existed:
                final.unlink(missing_ok=True)
        _remove(files)
        raise
    finally:
        for old in links:
            old.unlink(missing_ok=True)
    files.clear()


def _remove(files: list[tuple[Path, Path]]) -> None:
    for tmp, _ in files:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _check_data_target(model: ir.Model, data: Path, path: Path) -> None:
    """The output's data file must not replace a file that the model's weights are still read from
    (the input's external data)."""
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor) and _same_file(Path(tensor.path), data):
            raise SpaError(
                f"{path}: its external data file '{data}' is the input's; choose another output "
                "name"
            )


def inline_external_tensors(model: ir.Model) -> None:
    # Unchanged tensors still point into the input's data file; the output must stand alone.
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)


def clone(model: ir.Model) -> ir.Model:
    """An independent copy of the graph that shares the weight tensors (memory-mapped ones stay
    so): spa never writes into a tensor, it replaces a value's tensor (apply, compensate)."""
    return model.clone()
