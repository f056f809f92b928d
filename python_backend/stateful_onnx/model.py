"""Triton Python-backend model: a stateful ONNX graph with per-sequence state (local serving).

Plumbing only: requests and responses are converted here; everything else (config parsing, graph
validation, state per CORRID, batching, TTL) lives in ``sortformer_triton.stateful_runner`` so it is
tested without Triton. The local server puts the repository root on PYTHONPATH for that import.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional


def _honour_pythonpath() -> None:
    """Put PYTHONPATH on sys.path: the Python backend stub runs an *isolated* interpreter
    (sys.flags.isolated == 1), which ignores it, yet it is how the server says where
    ``sortformer_triton`` lives (the repository root locally, the image's copy in production)."""
    for entry in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)


_honour_pythonpath()

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from sortformer_triton.stateful_runner import (  # noqa: E402
    ControlNames,
    RunnerConfig,
    SequenceRequest,
    SequenceResult,
    StatefulOnnxRunner,
)


class TritonPythonModel:
    """Runs ``parameters.onnx_file`` as Triton's onnxruntime backend would with implicit state."""

    def initialize(self, args: Dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        config = RunnerConfig.from_model_config(
            model_config, args["model_repository"], args["model_version"]
        )
        self.controls = ControlNames.from_model_config(model_config)
        self.runner = StatefulOnnxRunner(config, log=pb_utils.Logger.log_warn)

    def execute(self, requests: List[Any]) -> List[Any]:
        results = self.runner.execute([self._to_sequence_request(r) for r in requests])
        return [self._to_response(r, res) for r, res in zip(requests, results)]

    def finalize(self) -> None:
        self.runner = None

    # ---- conversions ------------------------------------------------------------------------------
    def _to_sequence_request(self, request: Any) -> SequenceRequest:
        corrid = _scalar(request, self.controls.corrid)
        return SequenceRequest(
            corrid=None if corrid is None else int(corrid),
            start=bool(_scalar(request, self.controls.start) or 0),
            end=bool(_scalar(request, self.controls.end) or 0),
            inputs={
                name: tensor.as_numpy()
                for name in self.runner.input_names
                if (tensor := pb_utils.get_input_tensor_by_name(request, name)) is not None
            },
        )

    @staticmethod
    def _to_response(request: Any, result: SequenceResult) -> Any:
        if result.error is not None:  # the request's fault: INVALID_ARG (gRPC INVALID_ARGUMENT, HTTP 400)
            code = pb_utils.TritonError.INTERNAL if result.server_fault else pb_utils.TritonError.INVALID_ARG
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(result.error, code))
        wanted = set(request.requested_output_names())
        tensors = [
            pb_utils.Tensor(name, np.ascontiguousarray(value))
            for name, value in result.outputs.items()
            if not wanted or name in wanted
        ]
        return pb_utils.InferenceResponse(output_tensors=tensors)


def _scalar(request: Any, name: str) -> Optional[Any]:
    """The single value of a control tensor (START/END/CORRID arrive as [1, 1] tensors)."""
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return None
    return tensor.as_numpy().reshape(-1)[0].item()
