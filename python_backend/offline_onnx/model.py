"""Triton Python-backend model ``sortformer_offline`` (local flavour): the offline ONNX graph in onnxruntime.

Production runs the same file on Triton's onnxruntime backend with dynamic batching; here the Python backend's
dynamic batcher hands over the batch and ``sortformer_triton.offline_runner.OfflineRunner`` runs it (requests whose
AUDIO has the same length in one onnxruntime call, as the onnxruntime backend would batch them).
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List


def _honour_pythonpath() -> None:
    for entry in reversed(os.environ.get("PYTHONPATH", "").split(os.pathsep)):
        if entry and entry not in sys.path:
            sys.path.insert(0, entry)


_honour_pythonpath()

import triton_python_backend_utils as pb_utils  # noqa: E402

from sortformer_triton import contract, offline  # noqa: E402
from sortformer_triton.offline_runner import OfflineRunner  # noqa: E402
from sortformer_triton.sequences import config_parameters  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: Dict[str, str]) -> None:
        values = config_parameters(json.loads(args["model_config"]))
        path = os.path.join(args["model_repository"], args["model_version"], values["onnx_file"])
        self.runner = OfflineRunner(path, int(values.get("intra_op_threads", 2)))

    def execute(self, requests: List[Any]) -> List[Any]:
        batch = [(pb_utils.get_input_tensor_by_name(r, contract.AUDIO).as_numpy(),
                  pb_utils.get_input_tensor_by_name(r, contract.AUDIO_LENGTH).as_numpy()) for r in requests]
        try:
            results = self.runner.run(batch)
        except Exception as exc:  # noqa: BLE001 - onnxruntime's failure, reported per request
            error = pb_utils.TritonError(f"{offline.SORTFORMER}: {type(exc).__name__}: {exc}")
            return [pb_utils.InferenceResponse(output_tensors=[], error=error) for _ in requests]
        return [pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(offline.PREDS, preds),
                                                           pb_utils.Tensor(offline.N_FRAMES, n_frames)])
                for preds, n_frames in results]

    def finalize(self) -> None:
        self.runner = None
