"""Triton Python-backend model ``admission``: the first step of every ``diarizer_<preset>`` ensemble.

A START whose segment parameters the postprocessor would refuse is refused here, with the same parsing
(``timeline.parse_segment_params`` over the same config defaults), before the stateful models see the
request: a START they ran holds a sequence slot in each of them until END or the idle timeout, and a raw
client that never sends END would hold it that long (16 refused STARTs blocked a preset for a minute).
An ensemble stops at a step's error, and the preprocessor step reads ``ADMITTED_AUDIO_LENGTH`` from here,
so a refused request moves no state anywhere.

Plumbing only: AUDIO_LENGTH in, the same values out as ADMITTED_AUDIO_LENGTH, and the sortformer's
speaker-profile inputs of ``diarizer_<preset>``: no profile (one zero) and the save flag of the request's
``save_profile`` parameter (``sortformer_triton.profiles``). No sequence batcher (START
comes from the request's ``flags()``, forwarded by the ensemble), no state. Refusals are Triton
``INVALID_ARG`` errors (gRPC INVALID_ARGUMENT, HTTP 400).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List

import numpy as np
import triton_python_backend_utils as pb_utils


def _honour_pythonpath() -> None:
    """Put PYTHONPATH's entries on sys.path (the 2.51 stub's interpreter ignores PYTHONPATH)."""
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and entry not in sys.path:
            sys.path.append(entry)


_honour_pythonpath()

from sortformer_triton import contract  # noqa: E402  (needs the path fix above)
from sortformer_triton.sequences import config_parameters  # noqa: E402
from sortformer_triton.profiles import parse_save_profile  # noqa: E402
from sortformer_triton.speakers import parse_enroll, parse_stream_names  # noqa: E402
from sortformer_triton.timeline import parse_request_parameters, parse_segment_params  # noqa: E402


class TritonPythonModel:
    """Refuses STARTs with bad segment parameters; passes AUDIO_LENGTH on otherwise."""

    def initialize(self, args: Dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        try:
            self.params = parse_segment_params(config_parameters(model_config))
        except (ValueError, TypeError, AttributeError) as exc:
            raise pb_utils.TritonModelException(f"{contract.ADMISSION}: bad model config parameters: {exc}")

    def execute(self, requests: List[Any]) -> List[Any]:
        return [self._respond(request) for request in requests]

    def _respond(self, request: Any) -> Any:
        start = False
        try:
            start = bool(request.flags() & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START)
            values = parse_request_parameters(request.parameters())
            if start:
                parse_segment_params(values, self.params)
                parse_stream_names(values)
            parse_enroll(values)  # every request: a bad name refused here moves no state
            save = parse_save_profile(values)
            length = pb_utils.get_input_tensor_by_name(request, contract.AUDIO_LENGTH)
            if length is None:
                raise ValueError(f"input {contract.AUDIO_LENGTH} is missing")
        except ValueError as exc:  # the request's fault: invalid argument (gRPC INVALID_ARGUMENT, HTTP 400)
            what = ("START refused before the sequence started (no state or slot taken; send START again)"
                    if start else "request refused before any state moved (the stream may go on)")
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                f"{contract.ADMISSION}: {what}: {exc}", pb_utils.TritonError.INVALID_ARG))
        lengths = length.as_numpy()
        rows = lengths.shape[:-1]  # [1] batched, [] not
        header = np.zeros(rows + (contract.PROFILE_HEADER_LEN,), np.int64)
        header[..., 0] = contract.PROFILE_SAVE if save else 0
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(contract.ADMITTED_AUDIO_LENGTH, lengths),
            pb_utils.Tensor(contract.ADMITTED_PROFILE, np.zeros(rows + (1,), np.float32)),  # no profile
            pb_utils.Tensor(contract.ADMITTED_PROFILE_HEADER, header)])
