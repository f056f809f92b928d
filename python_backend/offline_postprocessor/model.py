"""Triton Python-backend model ``offline_postprocessor``: the last step of ``diarizer_offline``.

Plumbing only: the offline graph's PREDS / N_FRAMES are passed through and turned into segments by
``sortformer_triton.offline.segments_batch`` with the config's segment defaults (the streaming postprocessor's)
and the request's own parameters (onset, offset, pad_onset, pad_offset, min_duration_on, min_duration_off,
median_filter_frames: ``timeline.parse_segment_params``; ``offline_admission`` refused bad ones already).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List

import triton_python_backend_utils as pb_utils


def _honour_pythonpath() -> None:
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
            self.params = parse_segment_params(values)
        except (ValueError, TypeError) as exc:
            raise pb_utils.TritonModelException(f"{offline.POSTPROCESSOR}: bad model config parameters: {exc}")

    def execute(self, requests: List[Any]) -> List[Any]:
        return [self._respond(r) for r in requests]

    def _respond(self, request: Any) -> Any:
        try:
            params = parse_segment_params(parse_request_parameters(request.parameters()), self.params)
            preds = pb_utils.get_input_tensor_by_name(request, contract.step_tensor(offline.PREDS)).as_numpy()
            n_frames = pb_utils.get_input_tensor_by_name(request, contract.step_tensor(offline.N_FRAMES)).as_numpy()
            segments, counts = offline.segments_batch(preds, n_frames, params)
        except ValueError as exc:
            return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                f"{offline.POSTPROCESSOR}: {exc}", pb_utils.TritonError.INVALID_ARG))
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(offline.PREDS, preds), pb_utils.Tensor(offline.N_FRAMES, n_frames),
            pb_utils.Tensor(contract.SEGMENTS, segments), pb_utils.Tensor(contract.N_SEGMENTS, counts)])
