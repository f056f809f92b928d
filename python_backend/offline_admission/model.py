"""Triton Python-backend model ``offline_admission``: the first step of ``diarizer_offline``.

A request is one recording (AUDIO [N] float32, AUDIO_LENGTH [1]); it is refused here, before the offline graph
spends any compute on it, when AUDIO is longer than the repository's ``max_samples`` parameter, its length is
out of range, its samples are NaN/Inf or beyond +-4 (``sortformer_triton.offline.request_error``), or its segment
parameters are bad (``timeline.parse_segment_params``, over the postprocessor's defaults). Refusals
are Triton ``INVALID_ARG`` errors (gRPC INVALID_ARGUMENT, HTTP 400) of that request only. Otherwise AUDIO_LENGTH
goes on as ADMITTED_AUDIO_LENGTH, which the graph step reads (an ensemble stops at a step's error).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List

import triton_python_backend_utils as pb_utils


def _honour_pythonpath() -> None:
    """Put PYTHONPATH's entries on sys.path (the 2.51 stub's interpreter ignores PYTHONPATH)."""
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and entry not in sys.path:
            sys.path.append(entry)


_honour_pythonpath()

from sortformer_triton import contract, offline  # noqa: E402
from sortformer_triton.sequences import config_parameters  # noqa: E402
from sortformer_triton.timeline import parse_request_parameters, parse_segment_params  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: Dict[str, str]) -> None:
        values = config_parameters(json.loads(args["model_config"]))
        try:
            self.max_samples = int(values.pop(offline.MAX_SAMPLES_PARAMETER))
            self.params = parse_segment_params(values)  # the postprocessor's defaults: request values checked here
        except (KeyError, ValueError, TypeError) as exc:
            raise pb_utils.TritonModelException(f"{offline.ADMISSION}: bad {offline.MAX_SAMPLES_PARAMETER}: {exc}")

    def execute(self, requests: List[Any]) -> List[Any]:
        return [self._respond(r) for r in requests]

    def _respond(self, request: Any) -> Any:
        audio = pb_utils.get_input_tensor_by_name(request, contract.AUDIO)
        length = pb_utils.get_input_tensor_by_name(request, contract.AUDIO_LENGTH)
        problem = (f"inputs {contract.AUDIO} and {contract.AUDIO_LENGTH} are required" if audio is None or length is None
                   else offline.request_error(audio.as_numpy(), length.as_numpy(), self.max_samples))
        if problem is None:
            try:
                parse_segment_params(parse_request_parameters(request.parameters()), self.params)
            except ValueError as exc:
                problem = str(exc)
        if problem is not None:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                f"{offline.ADMISSION}: recording refused: {problem}", pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(offline.ADMITTED_AUDIO_LENGTH, length.as_numpy())])
