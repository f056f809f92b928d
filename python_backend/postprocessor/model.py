"""Triton Python-backend model ``postprocessor``: per-sequence speaker timeline -> SEGMENTS rows.

Plumbing only: tensors in and out, control inputs (START / END / CORRID), and the per-CORRID store.
The timeline, the row budget and the parameter parsing live in ``sortformer_triton`` (timeline,
segments_codec, sequences) and are tested without Triton; the server runs with the repository root
on PYTHONPATH for that import.

Model config ``parameters`` (strings): onset, offset, pad_onset, pad_offset, min_duration_on,
min_duration_off, median_filter_frames, state_ttl_seconds (>= the sequence idle timeout, because a
Python model is never told that Triton reaped an idle sequence). A request's ``parameters`` may set the
same segment parameters (not the TTL) on its START request, within the bounds of
``timeline.SegmentParams``. Later requests' parameters are ignored: the postprocessor is the ensemble's
last step, so refusing one of them would come after the stateful steps moved and break the stream.
Keys the postprocessor does not know are ignored: an ensemble hands every request's parameters to all
of its steps.

Streams are keyed by (CORRID, chunk_len, right context) -- the shapes of CONFIRMED and TENTATIVE --
because one postprocessor serves every preset and Triton's sequences are per model: the same id may run
on two presets at once (the generator refuses presets that share both sizes). Refusals are Triton
``INVALID_ARG`` errors (gRPC INVALID_ARGUMENT, HTTP 400), not INTERNAL.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Tuple

import numpy as np
import triton_python_backend_utils as pb_utils


def _honour_pythonpath() -> None:
    """Put PYTHONPATH's entries on sys.path: the 2.51 Python-backend stub starts its interpreter
    without reading PYTHONPATH (its sys.path holds only site-packages and the model's dirs)."""
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and entry not in sys.path:
            sys.path.append(entry)


_honour_pythonpath()

from sortformer_triton import contract  # noqa: E402  (needs the path fix above)
from sortformer_triton.presets import FRAME_SAMPLES  # noqa: E402
from sortformer_triton.segments_codec import StreamPostprocessor  # noqa: E402
from sortformer_triton.sequences import SequenceStore, config_parameters, ttl_from_model_config  # noqa: E402
from sortformer_triton.timeline import parse_segment_params  # noqa: E402

START, END, CORRID = contract.START, contract.END, contract.CORRID


class TritonPythonModel:
    """One ``StreamPostprocessor`` per sequence, keyed by CORRID, dropped at END or after the TTL."""

    def initialize(self, args: Dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        try:
            self.params = parse_segment_params(config_parameters(model_config))
            ttl = ttl_from_model_config(model_config)
        except ValueError as exc:
            raise pb_utils.TritonModelException(f"postprocessor: bad model config parameters: {exc}")
        self.batched = int(model_config.get("max_batch_size", 0)) > 0
        self.store: SequenceStore[StreamPostprocessor] = SequenceStore(ttl)
        self.invalid_arg = pb_utils.TritonError.INVALID_ARG

    def execute(self, requests: List[Any]) -> List[Any]:
        """One response per request, in order; a failing request does not affect the others."""
        expired = self.store.expire()
        if expired:
            pb_utils.Logger.log_warn(
                f"postprocessor: dropped {len(expired)} sequence(s) idle > {self.store.ttl_seconds:g} s "
                f"without END: {expired[:8]}"
            )
        return [self._respond(request) for request in requests]

    def finalize(self) -> None:
        self.store.clear()

    # ---- one request ------------------------------------------------------------------------------
    def _respond(self, request: Any) -> Any:
        try:
            rows, n_rows = self._run(request)
        except ValueError as exc:  # the request's fault: invalid argument (gRPC INVALID_ARGUMENT, HTTP 400)
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(f"postprocessor: {exc}", self.invalid_arg))
        except Exception as exc:  # every failure becomes this request's error, never the batch's
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(f"postprocessor: {type(exc).__name__}: {exc}"))
        n = np.array([n_rows], np.int32)
        if self.batched:
            rows, n = rows[None], n[None]
        return pb_utils.InferenceResponse(output_tensors=[
            pb_utils.Tensor(contract.SEGMENTS, np.ascontiguousarray(rows)),
            pb_utils.Tensor(contract.N_SEGMENTS, n),
        ])

    def _run(self, request: Any) -> Tuple[np.ndarray, int]:
        corrid = _scalar(request, CORRID)
        start, end = bool(_scalar(request, START)), bool(_scalar(request, END))
        confirmed, tentative = _input(request, contract.CONFIRMED), _input(request, contract.TENTATIVE)
        chunk_len = confirmed.shape[-2]
        key = (corrid, chunk_len, tentative.shape[-2])  # one postprocessor, every preset: see the docstring
        try:
            if start:
                params = parse_segment_params(_request_parameters(request), self.params)
                stream = self.store.start(
                    key, lambda: StreamPostprocessor(params, contract.segment_rows(chunk_len)))
            else:
                stream = self.store.get(key)
                if stream is None:
                    raise ValueError(
                        f"unknown sequence (CORRID {corrid}): its first request must carry START, or it "
                        f"ended, or it was idle > {self.store.ttl_seconds:g} s and expired")
            _refuse_bad_audio(request, end)
            return stream.step(
                confirmed=confirmed,
                n_confirmed=_input(request, contract.N_CONFIRMED),
                tentative=tentative,
                n_tentative=_input(request, contract.N_TENTATIVE),
                frame_offset=int(_input(request, contract.FRAME_OFFSET).reshape(-1)[0]),
                finished=bool(_input(request, contract.FINISHED).reshape(-1)[0]),
                end=end,
            )
        finally:
            if end:
                self.store.pop(key)


def _refuse_bad_audio(request: Any, end: bool) -> None:
    """The preprocessor graph checked the request's audio (INPUT_ERROR): a refused request changed no
    state anywhere, so the stream may go on; it gets an error that names the problems."""
    code = int(_input(request, contract.INPUT_ERROR).reshape(-1)[0])
    if code:
        step = _input(request, contract.CONFIRMED).shape[-2] * FRAME_SAMPLES
        after = "its END ended the stream" if end else "the stream is unchanged and may go on"
        raise ValueError(f"request refused ({after}): {contract.describe_input_error(code, step)}")


def _input(request: Any, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"input {name} is missing")
    return tensor.as_numpy()


def _scalar(request: Any, name: str) -> Any:
    """The single value of a control tensor (START / END / CORRID arrive as [1] or [1, 1])."""
    values = _input(request, name).reshape(-1)
    if values.size != 1:
        raise ValueError(f"control input {name} must hold one value, got {values.size}")
    value = values[0]
    return value.decode() if isinstance(value, bytes) else value.item()


def _request_parameters(request: Any) -> Dict[str, Any]:
    text = request.parameters()
    params = json.loads(text) if text else {}
    if not isinstance(params, dict):
        raise ValueError(f"request parameters must be a JSON object, got {text!r}")
    return params
