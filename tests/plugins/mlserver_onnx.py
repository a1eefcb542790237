"""MLServer runtime that serves an ONNX file through onnxruntime (MLServer 1.7.1 ships no ONNX runtime).

Loaded by a real ``mlserver start`` process in tests; model-settings.json points ``parameters.uri`` at the file.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxRuntimeModel(MLModel):
    async def load(self) -> bool:
        uri = self.settings.parameters.uri if self.settings.parameters else None
        if not uri:
            raise ValueError("model-settings.json needs parameters.uri = path of the .onnx file")
        self._sess = ort.InferenceSession(uri, providers=["CPUExecutionProvider"])
        self._inp = self._sess.get_inputs()[0].name
        self._out = self._sess.get_outputs()[0].name
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        x = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32)
        out = self._sess.run(None, {self._inp: x})[0]
        return InferenceResponse(model_name=self.name, id=payload.id,
                                 outputs=[NumpyCodec.encode_output(self._out, out)])
