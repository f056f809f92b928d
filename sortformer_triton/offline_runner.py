"""The local flavour's ``sortformer_offline``: the offline ONNX graph in onnxruntime, batched as Triton's
onnxruntime backend batches it (apart from ``sortformer_triton.offline`` so the client library, which imports
that module's names and rules, never reaches onnxruntime)."""
from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from .contract import AUDIO, AUDIO_LENGTH
from .offline import N_FRAMES, PREDS


class OfflineRunner:
    """The local flavour's ``sortformer_offline``: the same ONNX file in onnxruntime, as the onnxruntime backend
    runs it under dynamic batching (requests whose AUDIO has the same length share one run)."""

    def __init__(self, onnx_path: str, intra_op_threads: int = 2):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])

    def run(self, batch: List[Tuple[np.ndarray, np.ndarray]]) -> List[Tuple[np.ndarray, np.ndarray]]:
        """(AUDIO [rows, N], AUDIO_LENGTH [rows, 1]) per request -> (PREDS [rows, T, 4], N_FRAMES [rows, 1])."""
        out: List[Optional[Tuple[np.ndarray, np.ndarray]]] = [None] * len(batch)
        by_length: dict = {}
        for i, (audio, _) in enumerate(batch):
            by_length.setdefault(audio.shape[1], []).append(i)
        for group in by_length.values():
            audio = np.concatenate([batch[i][0] for i in group]).astype(np.float32, copy=False)
            length = np.concatenate([batch[i][1].reshape(-1, 1) for i in group]).astype(np.int64, copy=False)
            preds, n_frames = self.session.run([PREDS, N_FRAMES], {AUDIO: audio, AUDIO_LENGTH: length})
            row = 0
            for i in group:
                rows = batch[i][0].shape[0]
                out[i] = (preds[row: row + rows], n_frames[row: row + rows])
                row += rows
        return out  # type: ignore[return-value]
