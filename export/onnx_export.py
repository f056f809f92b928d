"""Write the two stateful graphs of a preset as ONNX files that NGC 24.10's onnxruntime backend loads.

Pinned for onnxruntime 1.19 (NGC 24.10): ONNX IR version 8 and opset 17, whatever the installed ``onnx``
would write by default. Every input and output has a dynamic batch dimension and, after it, exactly the
contract's static dims: the backend compares outputs *exactly*, so a dim that torch's tracer leaves
symbolic (the speaker axis of CONFIRMED/TENTATIVE comes out of a gather) would make Triton refuse the
model. Export declares the contract's dims on every graph output, and refuses to write a graph whose own
shape inference contradicts them.

Preset sizes and the model's dimensions are stored as ONNX metadata, so servers and tests can check
that a config matches the graph instead of recomputing it (FluidAudio's lesson).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Tuple

import onnx
import torch

from sortformer_triton import contract
from sortformer_triton.presets import Preset
from sortformer_triton.validator import MAX_IR_VERSION, MAX_OPSET

from .graphs import StreamingFeatures, StreamingStep
from .reference import configure_streaming

OPSET = 17  # NGC 24.10's onnxruntime backend is ORT 1.19 (opset <= 21); 17 is the first with LayerNormalization
IR_VERSION = 8  # ONNX IR of opset 17; ORT 1.19 loads IR <= 10 (onnx 1.22 would write IR 13 by default)
assert OPSET <= MAX_OPSET and IR_VERSION <= MAX_IR_VERSION
METADATA_KEY = "sortformer_triton"
BATCH_DIM = "batch"


class ExportShapeError(ValueError):
    """The traced graph's own shapes contradict the contract (a bug in the graph module)."""


def _declare(values, expected: Dict[str, Tuple[int, ...]], side: str) -> None:
    """Give every graph input/output the dims [batch, *contract dims]; refuse a contradicting static dim."""
    for value in values:
        if value.name not in expected:
            raise ExportShapeError(f"graph {side} {value.name!r} is not in the contract")
        want = expected[value.name]
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(want) + 1:
            raise ExportShapeError(f"graph {side} {value.name!r} has rank {len(dims)}, the contract says "
                                   f"[batch, *{list(want)}]")
        for i, (dim, size) in enumerate(zip(list(dims)[1:], want), start=1):
            if size == -1:  # a variable dim of the contract (PROFILE): symbolic in the graph, -1 in the config
                dim.Clear()
                dim.dim_param = f"{value.name}_{i}"
                continue
            if dim.HasField("dim_value") and dim.dim_value != size:
                raise ExportShapeError(f"graph {side} {value.name!r} dim {i} is {dim.dim_value}, the contract "
                                       f"says {size}")
            dim.Clear()
            dim.dim_value = size
        dims[0].Clear()
        dims[0].dim_param = BATCH_DIM


def declare_contract_shapes(model: onnx.ModelProto, io: contract.ModelIO) -> onnx.ModelProto:
    """Static contract dims on every input and output, checked against ONNX's strict shape inference. A graph
    with state (``io.states``) also takes the START control input; a stateless one (the offline graph) does not."""
    start = {contract.START: (1,)} if io.states else {}
    ins = {t.name: t.dims for t in io.inputs} | start | {s.name: s.dims for s in io.states}
    outs = {t.name: t.dims for t in io.outputs} | {contract.STATE_OUT_PREFIX + s.name: s.dims for s in io.states}
    _declare(model.graph.input, ins, "input")
    _declare(model.graph.output, outs, "output")
    try:  # an inferred static dim that differs from a declared one fails here
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except Exception as exc:  # noqa: BLE001 - onnx raises InferenceError subclasses of several kinds
        raise ExportShapeError(f"ONNX shape inference contradicts the contract's shapes: {exc}") from exc
    return model


def _example(io: contract.ModelIO, batch: int,
             given: Optional[Mapping[str, torch.Tensor]] = None) -> Tuple[List[str], List[torch.Tensor], List[str]]:
    """Example inputs to trace with: ``given`` ones as they are, the others zeros (a variable dim of 1); START and
    the states for a graph with state."""
    names, tensors = [], []
    dtypes = {"float32": torch.float32, "int32": torch.int32, "int64": torch.int64}
    given = given or {}
    for t in io.inputs:
        names.append(t.name)
        tensors.append(given[t.name] if t.name in given else
                       torch.zeros((batch, *[1 if d == -1 else d for d in t.dims]), dtype=dtypes[t.dtype]))
    if io.states:
        names.append(contract.START)
        tensors.append(torch.ones((batch, 1), dtype=torch.int32))
    for s in io.states:
        names.append(s.name)
        tensors.append(torch.zeros((batch, *s.dims), dtype=dtypes[s.dtype]))
    outs = [t.name for t in io.outputs] + [contract.STATE_OUT_PREFIX + s.name for s in io.states]
    return names, tensors, outs


def export_graph(module: torch.nn.Module, io: contract.ModelIO, path: Path, metadata: Dict[str, object],
                 example: Optional[Mapping[str, torch.Tensor]] = None) -> Path:
    """Trace ``module`` to ``path`` as NGC 24.10's onnxruntime backend loads it: IR 8 / opset 17, [batch, *contract
    dims] on every input and output (variable contract dims symbolic), ``metadata`` under METADATA_KEY.
    ``example``: inputs to trace with where zeros would not do (the offline graph's audio)."""
    names, example_tensors, outputs = _example(io, batch=2, given=example)
    dynamic = {n: {0: BATCH_DIM} for n in names + outputs}
    for t in io.inputs + io.outputs:  # the contract's variable dims (PROFILE, AUDIO of a recording) stay symbolic
        dynamic[t.name].update({i + 1: f"{t.name}_{i + 1}" for i, d in enumerate(t.dims) if d == -1})
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, tuple(example_tensors), str(path), input_names=names, output_names=outputs,
            dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    model = declare_contract_shapes(onnx.load(str(path)), io)
    model.ir_version = IR_VERSION
    opsets = {o.domain or "": o.version for o in model.opset_import}
    if opsets != {"": OPSET}:
        raise ExportShapeError(f"torch wrote opsets {opsets}, expected only the default domain at {OPSET}")
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def export_preprocessor(model, preset: Preset, path: Path, source: str) -> Path:
    module = StreamingFeatures(model.preprocessor.featurizer, preset).eval()
    meta = {"graph": "preprocessor", "preset": preset.to_dict(), "source": source}
    return export_graph(module, contract.preprocessor_io(preset), path, meta)


def weights_digest(model) -> str:
    """sha256 of the model's weights (names, dtypes, shapes, values), cached on the model."""
    cached = getattr(model, "_sortformer_triton_digest", None)
    if cached is None:
        h = hashlib.sha256()
        for name, tensor in sorted(model.state_dict().items()):
            t = tensor.detach().cpu().contiguous()
            h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
        cached = h.hexdigest()
        object.__setattr__(model, "_sortformer_triton_digest", cached)
    return cached


def profile_fingerprint(model, preset: Preset) -> int:
    """The 62-bit id of (weights, preset) a graph bakes in: a speaker profile restores only into the graph
    of the model and preset that saved it (contract.ERR_PROFILE_ORIGIN)."""
    text = json.dumps({"weights": weights_digest(model), "preset": preset.to_dict()}, sort_keys=True)
    return (int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 2) | 1


def export_step(model, preset: Preset, path: Path, source: str) -> Path:
    configure_streaming(model, preset)
    fingerprint = profile_fingerprint(model, preset)
    module = StreamingStep(model, preset, fingerprint).eval()
    emb_dim = module.D
    meta = {"graph": "sortformer", "preset": preset.to_dict(), "emb_dim": emb_dim, "source": source,
            "profile_fingerprint": fingerprint, "profile_format": contract.PROFILE_FORMAT,
            "profile_size": contract.profile_size(preset, emb_dim)}
    return export_graph(module, contract.sortformer_io(preset, emb_dim), path, meta)


def read_metadata(path: Path) -> Dict[str, object]:
    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise ValueError(f"{path} was not written by this exporter (no {METADATA_KEY} metadata)")
