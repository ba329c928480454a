"""onnxruntime scoring of a binary click model (converted from any library)."""

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

    The score is the output `output_name` (default: `probabilities` if the model
    has it, else its first output): the positive class's column of a (rows, 2)
    output, or the value of a (rows,) or (rows, 1) output.
    """

    def __init__(self, model_path: Path | str, output_name: str | None = None) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self.session = ort.InferenceSession(
            str(model_path), options, providers=["CPUExecutionProvider"]
        )
        (model_input,) = self.session.get_inputs()
        self.input_name = model_input.name
        width = model_input.shape[1] if len(model_input.shape) == 2 else None
        self.n_features: int | None = width if isinstance(width, int) else None
        outputs = [o.name for o in self.session.get_outputs()]
        self.output_name = output_name or (
            PROBABILITIES_OUTPUT if PROBABILITIES_OUTPUT in outputs else outputs[0]
        )

    def score(self, matrix: np.ndarray) -> np.ndarray:
        """Click probability per row (float32 -> float64 array of shape (rows,))."""
        if matrix.shape[0] == 0:
            return np.zeros(0, dtype=np.float64)
        features = np.ascontiguousarray(matrix, dtype=np.float32)
        (scores,) = self.session.run([self.output_name], {self.input_name: features})
        scores = np.asarray(scores)
        if scores.ndim == 2 and scores.shape[1] == 2:
            scores = scores[:, 1]
        return scores.reshape(len(features)).astype(np.float64)
