#!/usr/bin/env python3
"""Drives diffusiond's OpenAI-compatible endpoint with the official `openai`
client (pinned in gen_fixtures.py), as a user of that SDK would.

    openai_client_check.py BASE_URL SIZE [API_KEY]

Prints one JSON line: the images' sizes, the seeds echoed back, and the error the
client raised for an invalid request. Exits non-zero on any unexpected result.
"""

import base64
import io
import json
import struct
import sys

import openai


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


def main() -> None:
    base_url, size = sys.argv[1], sys.argv[2]
    key = sys.argv[3] if len(sys.argv) > 3 else "unused"
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key=key, max_retries=0, timeout=120)
    result = client.images.generate(
        prompt="a red circle above a blue square",
        n=2,
        size=size,
        response_format="b64_json",
        extra_body={"seed": 5, "num_inference_steps": 3, "guidance_scale": 3.0},
    )
    sizes = [png_size(base64.b64decode(d.b64_json)) for d in result.data]
    urls = client.images.generate(prompt="a green star", n=1, size=size, response_format="url", extra_body={"seed": 1, "num_inference_steps": 2})
    error = None
    try:
        client.images.generate(prompt="x", n=1, size="999x999")
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        error = {"status": e.status_code, "param": body.get("param"), "type": body.get("type"), "message": body.get("message")}
    print(json.dumps({"created": result.created, "sizes": sizes, "url": urls.data[0].url, "error": error}))


if __name__ == "__main__":
    main()
