"""The plain baseline, tuned as a competent user tunes it: FastAPI, decode and one ONNX Runtime
call inline in the handler, no batching, one intra-op thread per session (ONNX Runtime's default
pool spins threads that fight over the cores when several workers run), run under
``uvicorn[standard]`` (uvloop, httptools) with 1 or 2 workers.

    NAIVE_MODEL=models/x.onnx uvicorn bench.naive_server:app --workers 2 --no-access-log

Two stronger variants use the decoder tricks the service uses, to show how much of its lead is
the decoding alone: ``NAIVE_DRAFT=1`` decodes JPEGs at a reduced DCT scale (Pillow's ``draft``),
``NAIVE_SPNG=1`` decodes PNGs with libspng (``pyspng``) instead of Pillow's plugin.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request
from PIL import Image

options = ort.SessionOptions()
options.intra_op_num_threads = 1
options.inter_op_num_threads = 1
# NAIVE_PROVIDER=cuda: the same handler on the GPU, one session per worker process
providers = (["CUDAExecutionProvider", "CPUExecutionProvider"]
             if os.environ.get("NAIVE_PROVIDER") == "cuda" else ["CPUExecutionProvider"])
session = ort.InferenceSession(os.environ.get("NAIVE_MODEL", "models/fashion_mnist_seed_cnn.onnx"),
                               options, providers=providers)
input_name = session.get_inputs()[0].name
meta = session.get_modelmeta().custom_metadata_map
labels = json.loads(meta["imgserve.labels"])
spec = json.loads(meta["imgserve.preprocess"])
size = (spec["width"], spec["height"])
draft = os.environ.get("NAIVE_DRAFT") == "1"
spng = os.environ.get("NAIVE_SPNG") == "1"
if spng:
    import pyspng
app = FastAPI()


@app.post("/v1/classify")
async def classify(request: Request) -> dict[str, object]:
    body = await request.body()
    if spng and body.startswith(b"\x89PNG"):  # NAIVE_SPNG=1: one C call, then Pillow as usual
        img = Image.fromarray(pyspng.load(body))
    else:
        img = Image.open(io.BytesIO(body))
    if draft:  # NAIVE_DRAFT=1: JPEGs decoded at a reduced DCT scale, as Pillow's docs suggest
        img.draft(spec["color_mode"], size)
    img = img.convert(spec["color_mode"]).resize(size, Image.Resampling.BILINEAR)
    x = np.asarray(img, dtype=np.float32) / np.float32(255.0)
    x = x[None, None] if x.ndim == 2 else x.transpose(2, 0, 1)[None]
    probs = session.run(None, {input_name: x})[0][0]
    top = np.argsort(-probs)[:5]
    return {"results": [{"predictions": [{"label": labels[i], "index": int(i),
                                          "score": float(probs[i])} for i in top]}]}
