"""Triton Python-backend model ``postprocessor``: per-sequence speaker timeline -> SEGMENTS rows.

Plumbing only: tensors in and out, the sequence flags (START / END / CORRID), and the per-CORRID stores.
The timeline, the row budget and the parameter parsing live in ``sortformer_triton`` (timeline,
segments_codec, sequences) and are tested without Triton; the server runs with the repository root
on PYTHONPATH for that import.

Model config ``parameters`` (strings): onset, offset, pad_onset, pad_offset, min_duration_on,
min_duration_off, median_filter_frames, state_ttl_seconds (>= the sequence idle timeout, because a
Python model is never told that Triton reaped an idle sequence). A request's ``parameters`` may set the
same segment parameters (not the TTL) on its START request, within the bounds of
``timeline.SegmentParams``; ``admission``, the ensemble's first step, refuses a bad START with the same
parsing before the stateful models run it (so it takes no sequence slot). Later requests' segment
parameters are ignored: the postprocessor is the ensemble's last step, so refusing one of them would come
after the stateful steps moved and break the stream (``enroll`` is read on every request; ``admission``
checks its syntax on every request, before anything moves).
Keys the postprocessor does not know are ignored: an ensemble hands every request's parameters to all
of its steps.

Per stream it also keeps the slot names and the enrollment clips (``sortformer_triton.speakers``: request
parameter ``enroll`` on a clip's steps, ``speaker_names`` on START): the clips' frames are taken out of the
passed-through CONFIRMED / TENTATIVE / FRAME_OFFSET, so the meeting starts at frame 0, and SPEAKER_NAMES
goes out with every response. A refused clip or speaker profile refuses the stream until END.

It makes every ensemble output: the stateful steps' outputs arrive as ``STEP_<name>`` and leave as
``<name>`` (``contract.PASSED_THROUGH``) next to SEGMENTS, so a request for some of the outputs is only a
filter (Triton 2.51's ensemble prunes steps by the requested outputs; see ``repository.ensemble_model``).

The model has no sequence batcher (see ``repository.postprocessor_model``): CORRID, START and END come
from the request (``correlation_id()``, ``flags()``, forwarded by the ensemble). Streams are kept per
preset -- told apart by the rows of CONFIRMED and TENTATIVE (the generator refuses presets that share
both) -- and per CORRID, since Triton's sequences are per model and the same id may run on two presets at
once; each preset's streams expire with that preset's idle timeout (``preset_state_ttl_seconds``).
Refusals are Triton ``INVALID_ARG`` errors (gRPC INVALID_ARGUMENT, HTTP 400), not INTERNAL.
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
from sortformer_triton.profiles import saved_in  # noqa: E402
from sortformer_triton.segments_codec import StreamPostprocessor, pad_rows  # noqa: E402
from sortformer_triton.speakers import parse_enroll, parse_stream_names  # noqa: E402
from sortformer_triton.sequences import SequenceStore, config_parameters, ttl_from_model_config  # noqa: E402
from sortformer_triton.timeline import parse_request_parameters, parse_segment_params  # noqa: E402

PRESET_TTL_PARAMETER = "preset_state_ttl_seconds"  # sortformer_triton.repository.PRESET_TTL_PARAMETER


class TritonPythonModel:
    """One ``StreamPostprocessor`` per (preset, CORRID), dropped at END or after the preset's TTL."""

    def initialize(self, args: Dict[str, str]) -> None:
        model_config = json.loads(args["model_config"])
        try:
            values = config_parameters(model_config)
            self.params = parse_segment_params(values)
            self.default_ttl = ttl_from_model_config(model_config)
            ttls = json.loads(values.get(PRESET_TTL_PARAMETER) or "{}")
            self.stores: Dict[str, SequenceStore[StreamPostprocessor]] = {
                str(key): SequenceStore(float(ttl)) for key, ttl in ttls.items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise pb_utils.TritonModelException(f"postprocessor: bad model config parameters: {exc}")
        self.batched = int(model_config.get("max_batch_size", 0)) > 0
        self.invalid_arg = pb_utils.TritonError.INVALID_ARG

    def execute(self, requests: List[Any]) -> List[Any]:
        """One response per request, in order; a failing request does not affect the others."""
        for key, store in self.stores.items():
            expired = store.expire()
            if expired:
                pb_utils.Logger.log_warn(
                    f"postprocessor: dropped {len(expired)} sequence(s) idle > {store.ttl_seconds:g} s "
                    f"without END (preset shape {key}): {expired[:8]}")
        return [self._respond(request) for request in requests]

    def finalize(self) -> None:
        self.stores.clear()

    def _store(self, key: str) -> SequenceStore[StreamPostprocessor]:
        store = self.stores.get(key)
        if store is None:  # a preset this config does not list (hand-made ensembles): the default TTL
            store = self.stores[key] = SequenceStore(self.default_ttl)
        return store

    # ---- one request ------------------------------------------------------------------------------
    def _respond(self, request: Any) -> Any:
        try:
            out, passed = self._run(request)
        except ValueError as exc:  # the request's fault: invalid argument (gRPC INVALID_ARGUMENT, HTTP 400)
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(f"postprocessor: {exc}", self.invalid_arg))
        except Exception as exc:  # every failure becomes this request's error, never the batch's
            return pb_utils.InferenceResponse(
                output_tensors=[], error=pb_utils.TritonError(f"postprocessor: {type(exc).__name__}: {exc}"))
        rows, n = out.rows, np.array([out.n_rows], np.int32)
        names = np.array([name.encode("utf-8") for name in out.names], dtype=np.object_)
        if self.batched:
            rows, n, names = rows[None], n[None], names[None]
        # the visible frames: an enrollment clip's frames are taken out, meeting frames count from 0
        passed.update({
            contract.CONFIRMED: pad_rows(out.confirmed, passed[contract.CONFIRMED]),
            contract.N_CONFIRMED: np.full_like(passed[contract.N_CONFIRMED], len(out.confirmed)),
            contract.TENTATIVE: pad_rows(out.tentative, passed[contract.TENTATIVE]),
            contract.N_TENTATIVE: np.full_like(passed[contract.N_TENTATIVE], len(out.tentative)),
            contract.FRAME_OFFSET: np.full_like(passed[contract.FRAME_OFFSET], out.frame_offset),
        })
        if not saved_in(passed[contract.SAVED_PROFILE_HEADER]):  # another row of its batch saved: P zeros here
            passed[contract.SAVED_PROFILE] = np.zeros(passed[contract.SAVED_PROFILE].shape[:-1] + (1,), np.float32)
        # every ensemble output comes from here (contract.PASSED_THROUGH): a request for some of them is a filter
        passed_through = [pb_utils.Tensor(name, np.ascontiguousarray(passed[name])) for name in contract.PASSED_THROUGH]
        return pb_utils.InferenceResponse(output_tensors=passed_through + [
            pb_utils.Tensor(contract.SEGMENTS, np.ascontiguousarray(rows)),
            pb_utils.Tensor(contract.N_SEGMENTS, n),
            pb_utils.Tensor(contract.SPEAKER_NAMES, names),
        ])

    def _run(self, request: Any) -> Tuple[Any, Dict[str, np.ndarray]]:
        corrid = request.correlation_id()
        if not corrid:
            raise ValueError("the request has no sequence id (correlation id): send it as part of a sequence")
        flags = request.flags()
        start = bool(flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_START)
        end = bool(flags & pb_utils.TRITONSERVER_REQUEST_FLAG_SEQUENCE_END)
        passed = {name: _input(request, contract.step_tensor(name)) for name in contract.PASSED_THROUGH}
        confirmed, tentative = passed[contract.CONFIRMED], passed[contract.TENTATIVE]
        chunk_len = confirmed.shape[-2]
        store = self._store(f"{chunk_len},{tentative.shape[-2]}")  # one postprocessor, every preset
        try:
            values = parse_request_parameters(request.parameters())
            if start:
                params = parse_segment_params(values, self.params)
                names = parse_stream_names(values)
                stream = store.start(corrid, lambda: StreamPostprocessor(
                    params, contract.segment_rows(chunk_len), chunk_len, names))
            else:
                stream = store.get(corrid)
                if stream is None:
                    raise ValueError(
                        f"unknown sequence (CORRID {corrid}): its first request must carry START, or it "
                        f"ended, or it was idle > {store.ttl_seconds:g} s and expired")
            _refuse_bad_audio(request, end, chunk_len, stream)
            enroll, overwrite = parse_enroll(values)
            out = stream.step(
                confirmed=confirmed,
                n_confirmed=passed[contract.N_CONFIRMED],
                tentative=tentative,
                n_tentative=passed[contract.N_TENTATIVE],
                frame_offset=int(passed[contract.FRAME_OFFSET].reshape(-1)[0]),
                finished=bool(passed[contract.FINISHED].reshape(-1)[0]),
                end=end,
                enroll=enroll,
                overwrite=overwrite,
            )
            return out, passed
        finally:
            if end:
                store.pop(corrid)


def _refuse_bad_audio(request: Any, end: bool, chunk_len: int, stream: StreamPostprocessor) -> None:
    """The preprocessor graph checked the request's audio (INPUT_ERROR), the sortformer graph its features
    (FEATURE_ERROR): a refused request changed no state anywhere, so the stream may go on; it gets an error
    that names the problems. A refused speaker profile refuses the stream: its START audio went into the
    preprocessor's state, the sortformer's started empty."""
    code = int(_input(request, contract.INPUT_ERROR).reshape(-1)[0])
    code |= int(_input(request, contract.FEATURE_ERROR).reshape(-1)[0])
    if code:
        step = chunk_len * FRAME_SAMPLES
        problems = contract.describe_input_error(code, step)
        if code & contract.PROFILE_ERRORS:
            stream.speakers.refused = f"its speaker profile was refused: {problems}"
            raise ValueError(f"START from a speaker profile refused (the stream is refused until END; start "
                             f"it again with a profile this model and preset saved): {problems}")
        after = "its END ended the stream" if end else "the stream is unchanged and may go on"
        raise ValueError(f"request refused ({after}): {problems}")


def _input(request: Any, name: str) -> np.ndarray:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"input {name} is missing")
    return tensor.as_numpy()

