"""Write the two stateful graphs of a preset as ONNX files (opset <= 20, batch axis dynamic).

Preset sizes and the model's dimensions are stored as ONNX metadata, so servers and tests can check
that a config matches the graph instead of recomputing it (FluidAudio's lesson).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import onnx
import torch

from sortformer_triton import contract
from sortformer_triton.presets import Preset

from .graphs import StreamingFeatures, StreamingStep
from .reference import configure_streaming

OPSET = 17  # NGC 24.10's onnxruntime backend is ORT 1.19 (opset <= 21); 17 is the first with LayerNormalization
METADATA_KEY = "sortformer_triton"


def _example(io: contract.ModelIO, batch: int) -> Tuple[List[str], List[torch.Tensor], List[str]]:
    names, tensors = [], []
    dtypes = {"float32": torch.float32, "int32": torch.int32, "int64": torch.int64}
    for t in io.inputs:
        names.append(t.name)
        tensors.append(torch.zeros((batch, *t.dims), dtype=dtypes[t.dtype]))
    names.append(contract.START)
    tensors.append(torch.ones((batch, 1), dtype=torch.int32))
    for s in io.states:
        names.append(s.name)
        tensors.append(torch.zeros((batch, *s.dims), dtype=dtypes[s.dtype]))
    outs = [t.name for t in io.outputs] + [contract.STATE_OUT_PREFIX + s.name for s in io.states]
    return names, tensors, outs


def _export(module: torch.nn.Module, io: contract.ModelIO, path: Path, metadata: Dict[str, object]) -> Path:
    names, example, outputs = _example(io, batch=2)
    dynamic = {n: {0: "batch"} for n in names + outputs}
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, tuple(example), str(path), input_names=names, output_names=outputs,
            dynamic_axes=dynamic, opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    model = onnx.load(str(path))
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(metadata, sort_keys=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def export_preprocessor(model, preset: Preset, path: Path, source: str) -> Path:
    module = StreamingFeatures(model.preprocessor.featurizer, preset).eval()
    meta = {"graph": "preprocessor", "preset": preset.to_dict(), "source": source}
    return _export(module, contract.preprocessor_io(preset), path, meta)


def export_step(model, preset: Preset, path: Path, source: str) -> Path:
    configure_streaming(model, preset)
    module = StreamingStep(model, preset).eval()
    emb_dim = module.D
    meta = {"graph": "sortformer", "preset": preset.to_dict(), "emb_dim": emb_dim, "source": source}
    return _export(module, contract.sortformer_io(preset, emb_dim), path, meta)


def read_metadata(path: Path) -> Dict[str, object]:
    model = onnx.load(str(path), load_external_data=False)
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            return json.loads(prop.value)
    raise ValueError(f"{path} was not written by this exporter (no {METADATA_KEY} metadata)")
