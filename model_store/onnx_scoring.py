"""onnxruntime scoring of a converted LightGBM click model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

PROBABILITIES_OUTPUT = "probabilities"


class OnnxScorer:
    """One inference session with one thread.

    Two intra-op threads on a 2-core machine raise p99 sharply (the session
    competes with the server's own threads), and a request scores at most a few
    hundred rows, so one thread per session is the right setting here.
    """

    def __init__(self, model_path: Path | str) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.session.get_inputs()[0].name
        self.n_features = int(self.session.get_inputs()[0].shape[1])

    def score(self, matrix: np.ndarray) -> np.ndarray:
        """Click probability per row (float32 -> float64 array of shape (rows,))."""
        if matrix.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        features = np.ascontiguousarray(matrix, dtype=np.float32)
        (probabilities,) = self.session.run([PROBABILITIES_OUTPUT], {self.input_name: features})
        return probabilities[:, 1].astype(np.float64)
