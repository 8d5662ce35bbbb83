"""BASELINE, not the product: the original container's design rebuilt minimally, for comparison.

Per request it builds the inputs with `CLIPProcessor` (PIL preprocessing of full-size images),
re-encodes every prompt, and runs one forward pass of its own: no cross-request batching, no
text cache, no fast decoding. Same model files, same response rules, same device as the original
(CUDA in fp16 when a GPU is visible, else CPU in fp32). `scripts/bench.py` drives
it under the same load as the service.

    python benchmarks/baseline_server.py --model-dir DIR --port 8090
"""

from __future__ import annotations

import argparse
import base64
import io

import torch
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from transformers import CLIPModel

from clip_runner.answers.zero_shot import predict
from clip_runner.model.encoding import pick_device
from clip_runner.model.store import load_processor


def build_app(model_dir: str) -> Starlette:
    device, dtype = pick_device()
    model = CLIPModel.from_pretrained(model_dir).to(device=device, dtype=dtype).eval()
    processor = load_processor(model_dir)

    def invocations_sync(body: dict) -> list[dict]:
        images = [
            Image.open(io.BytesIO(base64.b64decode(s))).convert("RGB") for s in body["images"]
        ]
        names = [name for name, _ in body["classes"]]
        flags = [bool(flag) for _, flag in body["classes"]]
        prompts = [f"a photo of a {name}" for name in names]
        inputs = processor(text=prompts, images=images, return_tensors="pt", padding=True)
        inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
        with torch.no_grad():
            logits = model(**inputs.to(device)).logits_per_image
            probabilities = logits.float().softmax(dim=-1).cpu().numpy()
        return [predict(row, names, flags, 3) for row in probabilities]

    async def invocations(request: Request) -> Response:
        from starlette.concurrency import run_in_threadpool

        body = await request.json()
        return JSONResponse(await run_in_threadpool(invocations_sync, body))

    async def ping(_: Request) -> Response:
        return Response(status_code=200)

    return Starlette(
        routes=[
            Route("/invocations", invocations, methods=["POST"]),
            Route("/ping", ping, methods=["GET"]),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--port", type=int, default=8090)
    args = parser.parse_args()
    uvicorn.run(build_app(args.model_dir), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
