"""Raw Triton sequence requests for the hardening tests: exactly what a careless client could send.

The client library never sends a malformed request, so the tests that need one (wrong dtype or shape,
NaN, a missing START ...) talk to Triton with plain ``tritonclient.grpc`` through this helper.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import numpy as np

from sortformer_triton import contract
from sortformer_triton.presets import Preset
from sortformer_triton.protocol import PredictionAssembler, StepRequest, iter_steps
from sortformer_triton.segments_codec import unpack_segments
from sortformer_triton.timeline import Segment

OUTPUTS = (contract.CONFIRMED, contract.N_CONFIRMED, contract.TENTATIVE, contract.N_TENTATIVE,
           contract.FRAME_OFFSET, contract.FINISHED, contract.SEGMENTS, contract.N_SEGMENTS)


@dataclasses.dataclass
class Reply:
    outputs: Optional[Dict[str, np.ndarray]]
    error: str = ""  # Triton's error message ('' when the request succeeded)
    status: str = ""  # its gRPC status code, e.g. 'StatusCode.INVALID_ARGUMENT'


class RawSequence:
    """One sequence on ``diarizer_<preset>`` driven request by request over unary gRPC."""

    def __init__(self, url: str, preset: Preset, sequence_id: int, model: Optional[str] = None,
                 timeout_s: float = 60.0) -> None:
        import tritonclient.grpc as grpcclient

        self._grpc = grpcclient
        self.client = grpcclient.InferenceServerClient(url)
        self.preset = preset
        self.sequence_id = sequence_id
        self.model = model or contract.ensemble_name(preset)
        self.timeout_s = timeout_s
        self.assembler = PredictionAssembler()
        self.finalized: List[Segment] = []

    def send(self, audio: np.ndarray, length: int, start: bool = False, end: bool = False,
             audio_dtype: str = "FP32", parameters: Optional[Dict[str, object]] = None,
             outputs: Sequence[str] = OUTPUTS) -> Reply:
        """One request; AUDIO is sent with the shape and dtype given (``audio_dtype`` the Triton name),
        with request ``parameters`` and the ``outputs`` asked for."""
        from tritonclient.utils import InferenceServerException

        audio = np.asarray(audio).reshape(1, -1)
        inp = self._grpc.InferInput(contract.AUDIO, list(audio.shape), audio_dtype)
        inp.set_data_from_numpy(audio)
        n = self._grpc.InferInput(contract.AUDIO_LENGTH, [1, 1], contract.AUDIO_LENGTH_TENSOR.client_dtype)
        n.set_data_from_numpy(np.array([[length]], contract.AUDIO_LENGTH_TENSOR.dtype))
        try:
            result = self.client.infer(
                self.model, [inp, n], outputs=[self._grpc.InferRequestedOutput(o) for o in outputs],
                sequence_id=self.sequence_id, sequence_start=start, sequence_end=end,
                client_timeout=self.timeout_s, parameters=parameters)
        except InferenceServerException as exc:
            return Reply(None, str(exc.message()), str(exc.status()))
        return Reply({o: result.as_numpy(o) for o in outputs})

    def step(self, request: StepRequest, parameters: Optional[Dict[str, object]] = None) -> Reply:
        """A valid protocol step; its predictions and finalized segments are collected."""
        reply = self.send(request.audio, request.valid, request.start, request.end, parameters=parameters)
        if reply.outputs is not None:
            self.collect(reply.outputs)
        return reply

    def collect(self, out: Dict[str, np.ndarray]) -> None:
        def scalar(name: str) -> int:
            return int(out[name].reshape(-1)[0])

        self.assembler.add(out[contract.CONFIRMED][0], scalar(contract.N_CONFIRMED), scalar(contract.FRAME_OFFSET),
                           out[contract.TENTATIVE][0], scalar(contract.N_TENTATIVE), bool(scalar(contract.FINISHED)))
        rows = unpack_segments(out[contract.SEGMENTS], scalar(contract.N_SEGMENTS))
        self.finalized += [s for s in rows if s.finalized]

    def close(self) -> None:
        self.client.close()


def steps(preset: Preset, audio: np.ndarray) -> List[StepRequest]:
    return list(iter_steps(preset, audio))


def solo_run(url: str, preset: Preset, audio: np.ndarray, sequence_id: int) -> "tuple[np.ndarray, List[Segment]]":
    """One stream alone, every step accepted and every frame confirmed: its predictions and finalized segments."""
    seq = RawSequence(url, preset, sequence_id)
    try:
        for request in steps(preset, audio):
            reply = seq.step(request)
            assert reply.error == "", reply.error
        assert seq.assembler.finished
        return seq.assembler.confirmed, seq.finalized
    finally:
        seq.close()
