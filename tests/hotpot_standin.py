"""A stand-in Hotpot server for the tests: a real HTTP server on loopback that follows the
documented contract (multipart fields, ``Authorization``, image bytes back with
``X-API-Credits-Left``, ``{"code", "message"}`` errors) and can be told to fail."""

from __future__ import annotations

import io
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from PIL import Image

from producer.servers import free_port

KEY = "hotpot-test-key"


@dataclass
class Failure:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


class StandIn:
    def __init__(self) -> None:
        self.failures: deque[Failure] = deque()
        self.calls: list[dict[str, Any]] = []
        self.credits = 1000
        app = FastAPI()

        @app.post("/stable-diffusion-{tier}")
        async def generate(tier: str, request: Request) -> Response:
            form = await request.form()
            fields = {name: str(value) for name, value in form.items()}
            self.calls.append({"tier": tier, "at": time.time(), **fields})
            if self.failures:
                failure = self.failures.popleft()
                if failure.delay:
                    time.sleep(failure.delay)
                if failure.status != 200:
                    body = {"code": failure.status, "message": f"stand-in {failure.status}"}
                    return JSONResponse(body, failure.status, headers=failure.headers)
            auth = request.headers.get("authorization")
            if not auth:
                return JSONResponse({"code": 401, "message": "missing key"}, 401)
            if auth != KEY:
                return JSONResponse({"code": 403, "message": "bad key"}, 403)
            if not fields.get("inputText"):
                return JSONResponse({"code": 400, "message": "inputText required"}, 400)
            self.credits -= 1
            width, height = int(fields.get("width", 32)), int(fields.get("height", 32))
            colour = int(fields.get("seed", 0)) % 256
            buffer = io.BytesIO()
            fmt = "PNG" if fields.get("outputFormat") == "png" else "JPEG"
            Image.new("RGB", (width, height), (colour, 80, 160)).save(buffer, fmt)
            return Response(
                buffer.getvalue(),
                media_type=f"image/{fmt.lower()}",
                headers={"X-API-Credits-Left": str(self.credits)},
            )

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)

    def fail(self, *failures: Failure) -> None:
        self.failures.extend(failures)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
