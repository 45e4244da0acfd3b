"""Concrete shapes of every tensor, for the analysis and the counter.

Symbolic dims (batch, sequence) are fixed for the moment of inference: from `input_shapes` where
given, else 1. The model's own input shapes are restored afterwards, symbolic dims and all.
"""

from __future__ import annotations

import logging
import math

import onnx_ir as ir

from spa.errors import SpaError, first_line
from spa.normalize import infer_shapes

logger = logging.getLogger(__name__)

# No real tensor at the analysis' shapes comes near this (2**36 elements is 256 GiB of float32).
_MAX_ELEMENTS = 2**36


def parse_input_shapes(text: str) -> dict[str, list[int]]:
    """`x:1,3,224,224 mask:1,128` -> {"x": [1, 3, 224, 224], "mask": [1, 128]}."""
    shapes = {}
    for item in text.replace(";", " ").split():
        name, sep, dims = item.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise SpaError(f"--input-shapes: expected NAME:D1,D2,... but got '{item}'") from None
    return shapes


def concrete_shapes(
    model: ir.Model, input_shapes: dict[str, list[int]]
) -> dict[ir.Value, tuple[int, ...]]:
    graph = model.graph
    names = {v.name for v in graph.inputs}
    unknown = set(input_shapes) - names
    if unknown:
        raise SpaError(
            f"--input-shapes names unknown input(s) {sorted(unknown)}; inputs are {sorted(names)}"
        )
    original = {v: v.shape for v in _all_values(graph)}
    try:
        for v in graph.inputs:
            v.shape = ir.Shape(_fixed_dims(v, input_shapes.get(v.name)))
        infer_shapes(model, keep_signature=False)
        shapes = {}
        for v in _all_values(graph):
            if v.shape is not None and all(isinstance(d, int) and d >= 0 for d in v.shape):
                shapes[v] = tuple(v.shape)
        for v, shape in shapes.items():
            if math.prod(shape) > _MAX_ELEMENTS:
                raise SpaError(
                    f"tensor '{v.name}' would have {math.prod(shape):,} elements {list(shape)}: is "
                    "the model corrupt?"
                )
        missing = [
            v
            for node in graph
            for v in node.outputs
            if v.name and v not in shapes and isinstance(v.type, ir.TensorType)
        ]
        if missing:
            shapes.update(_shapes_from_a_run(model, missing, input_shapes))
        return shapes
    finally:
        for v, shape in original.items():
            v.shape = shape


def _shapes_from_a_run(
    model: ir.Model, values: list[ir.Value], input_shapes
) -> dict[ir.Value, tuple[int, ...]]:
    """Shapes that inference could not work out (Range, GatherND, ...), read off one onnxruntime
    run on inputs of the same concrete shapes. Nothing if onnxruntime cannot run the model."""
    from spa.runtime import isolated, random_inputs, session

    outputs = list(model.graph.outputs)
    try:
        model.graph.outputs.extend(values)
        sess = session(model)
        feeds = random_inputs(sess, input_shapes)
        names = [v.name for v in values]
        shown = ", ".join(f"{k} {list(v.shape)}" for k, v in feeds.items())
        shapes = isolated(
            lambda: [r.shape for r in sess.run(names, feeds)],
            f"running the model on inputs {shown} (give other sizes with --input-shapes)",
        )
        return dict(zip(values, map(tuple, shapes)))
    except SpaError:
        raise
    except Exception as e:  # custom ops, or a model onnxruntime refuses: those shapes stay unknown
        logger.info("no shapes from onnxruntime: %s", first_line(e))
        return {}
    finally:
        model.graph.outputs.clear()
        model.graph.outputs.extend(outputs)


def _fixed_dims(value: ir.Value, given: list[int] | None) -> list[int]:
    if given is not None and any(d < 1 for d in given):
        raise SpaError(f"--input-shapes {value.name}: dims must be positive, got {given}")
    if value.shape is None:
        if given is None:
            raise SpaError(
                f"input '{value.name}' has no shape: give one with --input-shapes "
                f"{value.name}:D1,D2,..."
            )
        return given
    if given is not None:
        if len(given) != len(value.shape):
            raise SpaError(
                f"--input-shapes {value.name}: {len(given)} dims given, the input has "
                f"{len(value.shape)}"
            )
        for have, want in zip(value.shape, given):
            if isinstance(have, int) and have >= 0 and have != want:
                raise SpaError(
                    f"--input-shapes {value.name}: dim {want} contradicts the model's fixed dim "
                    f"{have}"
                )
        return given
    # Some converters write -1 for a dynamic dim: it is as unknown as a symbolic one.
    return [d if isinstance(d, int) and d >= 0 else 1 for d in value.shape]


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    yield from graph.initializers.values()
    for node in graph:
        yield from (o for o in node.outputs if o.name)
