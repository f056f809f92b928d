"""Whole recordings through ``diarizer_offline`` (the offline Sortformer v1: one request per recording).

Each recording is resampled to 16 kHz mono, zero-padded to a multiple of ``offline.BUCKET_SAMPLES`` (so
recordings of similar length share one of the server's dynamic batches) and sent as one unary request;
``concurrency`` requests are in flight at once. Results are ``Result`` objects like a stream's (every segment
finalized, ``preset == "offline"``, ``requests == 1``), in input order.
"""
from __future__ import annotations

import concurrent.futures
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from sortformer_triton import contract, offline
from sortformer_triton.presets import SAMPLE_RATE
from sortformer_triton.segments_codec import unpack_segments
from sortformer_triton.timeline import parse_segment_params

from .audio import resample_to_16k
from .errors import DiarizationError
from .results import Result
from .transport import check_parameters, convert_error

OUTPUTS = (offline.PREDS, offline.N_FRAMES, contract.SEGMENTS, contract.N_SEGMENTS)
DEFAULT_CONCURRENCY = 8


def _inputs(module: Any, audio: np.ndarray, binary: bool) -> List[Any]:
    padded = np.zeros((1, offline.padded_length(audio.size)), np.float32)
    padded[0, : audio.size] = audio
    tensors = [module.InferInput(contract.AUDIO, list(padded.shape), "FP32"),
               module.InferInput(contract.AUDIO_LENGTH, [1, 1], "INT64")]
    kw = {"binary_data": True} if binary else {}
    tensors[0].set_data_from_numpy(padded, **kw)
    tensors[1].set_data_from_numpy(np.array([[audio.size]], np.int64), **kw)
    return tensors


def decode(outputs: Dict[str, np.ndarray], n_samples: int) -> Result:
    """One response's outputs (a leading batch dim of 1) as a ``Result``."""
    n_frames = int(np.asarray(outputs[offline.N_FRAMES]).reshape(-1)[0])
    preds = np.asarray(outputs[offline.PREDS], np.float32).reshape(-1, outputs[offline.PREDS].shape[-1])
    if not 0 <= n_frames <= preds.shape[0]:
        raise DiarizationError(f"{offline.ENSEMBLE} returned N_FRAMES {n_frames} for {preds.shape[0]} rows")
    segments = unpack_segments(outputs[contract.SEGMENTS], outputs[contract.N_SEGMENTS])
    return Result(sequence_id=0, preset="offline", n_samples=int(n_samples), probs=preds[:n_frames].copy(),
                  segments=tuple(segments), requests=1, finished=True)


def diarize_offline(client: Any, audios: Sequence[np.ndarray], sample_rate: int = SAMPLE_RATE,
                    segment_params: Optional[Dict[str, Any]] = None,
                    concurrency: int = DEFAULT_CONCURRENCY) -> List[Result]:
    """``DiarizationClient.diarize_offline``: ``audios`` (arrays at ``sample_rate``) -> one Result each."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    params = check_parameters(segment_params)
    parse_segment_params(segment_params or {})  # the server's bounds: refused here, before any request
    recordings = [resample_to_16k(a, sample_rate) for a in audios]
    for i, audio in enumerate(recordings):
        if audio.size < offline.FRAME_SAMPLES:
            raise ValueError(f"recording {i} has {audio.size} samples at 16 kHz; the offline model needs at least "
                             f"{offline.FRAME_SAMPLES} (one 80 ms frame)")

    def one(audio: np.ndarray) -> Result:
        try:
            if client.protocol == "http":
                import tritonclient.http as httpclient

                http = httpclient.InferenceServerClient(client.url, connection_timeout=client.timeout,
                                                        network_timeout=client.timeout)
                try:
                    result = http.infer(offline.ENSEMBLE, _inputs(httpclient, audio, True),
                                        outputs=[httpclient.InferRequestedOutput(n, binary_data=True) for n in OUTPUTS],
                                        headers=dict(client._http_headers), parameters=params or None)
                finally:
                    http.close()
            else:  # grpc and grpc-stream: unary calls on the shared channel
                import tritonclient.grpc as grpcclient

                result = client._shared_grpc().infer(
                    offline.ENSEMBLE, _inputs(grpcclient, audio, False),
                    outputs=[grpcclient.InferRequestedOutput(n) for n in OUTPUTS],
                    client_timeout=client.timeout, parameters=params or None)
            outputs = {n: result.as_numpy(n) for n in OUTPUTS}
        except Exception as exc:  # noqa: BLE001 - converted, with Triton's message
            raise convert_error(exc, client.url, client.protocol, offline.ENSEMBLE) from exc
        return decode(outputs, audio.size)

    if len(recordings) <= 1:
        return [one(a) for a in recordings]
    with concurrent.futures.ThreadPoolExecutor(min(concurrency, len(recordings))) as pool:
        return list(pool.map(one, recordings))
