"""The naive baseline: plain FastAPI, one ONNX Runtime call per request, no batching, plain
Pillow decode. Run: NAIVE_MODEL=models/x.onnx uvicorn bench.naive_server:app --workers 2"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from PIL import Image

session = ort.InferenceSession(os.environ.get("NAIVE_MODEL", "models/fashion_mnist_seed_cnn.onnx"),
                               providers=["CPUExecutionProvider"])
meta = session.get_modelmeta().custom_metadata_map
labels = json.loads(meta["imgserve.labels"])
spec = json.loads(meta["imgserve.preprocess"])
app = FastAPI()


@app.post("/v1/classify")
async def classify(request: Request) -> dict[str, object]:
    body = await request.body()
    img = Image.open(io.BytesIO(body)).convert(spec["color_mode"])
    img = img.resize((spec["width"], spec["height"]), Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32)[None, None] / 255.0
    probs = session.run(None, {"input": x})[0][0]
    top = np.argsort(-probs)[:5]
    return {"results": [{"predictions": [{"label": labels[i], "index": int(i),
                                          "score": float(probs[i])} for i in top]}]}
