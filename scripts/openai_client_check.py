#!/usr/bin/env python3
"""Drives diffusiond's OpenAI-compatible endpoints with the official `openai`
client (pinned in gen_fixtures.py), as a user of that SDK would: generations
(b64 and url), edits with a transparent mask and without one, variations,
JPEG and WebP output, and streamed generation with partial images.

    openai_client_check.py BASE_URL SIZE [API_KEY]

Prints one JSON line: the images' sizes, the seeds echoed back, what edits kept,
the stream's events, and the error the client raised for an invalid request.
Exits non-zero on any unexpected result.
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
    webp = client.images.generate(prompt="a purple cross", n=1, size=size, output_format="webp",
                                  extra_body={"seed": 7, "num_inference_steps": 2})
    riff = base64.b64decode(webp.data[0].b64_json)
    out = {"created": result.created, "sizes": sizes, "url": urls.data[0].url, "error": error,
           "webp": riff[:4] == b"RIFF" and riff[8:12] == b"WEBP"}
    out.update(edits(client, size))
    out["stream"] = stream(client, size)
    print(json.dumps(out))


def png_file(image) -> io.BytesIO:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    buffer.seek(0)
    buffer.name = "image.png"
    return buffer


def edits(client: "openai.OpenAI", size: str) -> dict:
    from PIL import Image

    w, h = (int(v) for v in size.split("x"))
    source = Image.new("RGB", (w, h), (200, 30, 30))
    # OpenAI's convention: the mask's transparent pixels are repainted (here the right half).
    mask = Image.new("RGBA", (w, h), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (w // 2, 0, w, h))
    edited = client.images.edit(image=png_file(source), mask=png_file(mask), prompt="a blue square", n=1, size=size,
                                response_format="b64_json", extra_body={"seed": 3, "num_inference_steps": 4})
    result = Image.open(io.BytesIO(base64.b64decode(edited.data[0].b64_json))).convert("RGB")
    kept = all(result.getpixel((x, y)) == (200, 30, 30) for x in range(w // 2) for y in range(h))
    whole = client.images.edit(image=png_file(source), prompt="a green star", size=size, output_format="jpeg",
                               output_compression=80, extra_body={"seed": 4, "num_inference_steps": 4, "strength": 0.5})
    jpeg = base64.b64decode(whole.data[0].b64_json)[:3] == b"\xff\xd8\xff"
    varied = client.images.create_variation(image=png_file(source), n=2, size=size, response_format="b64_json",
                                            extra_body={"seed": 5})
    # The SDK's variation call has no output_format argument; the form field goes through extra_body.
    varied_jpeg = client.images.create_variation(image=png_file(source), n=1, size=size, response_format="b64_json",
                                                 extra_body={"seed": 5, "output_format": "jpeg"})
    return {"edit_kept_unmasked": kept, "edit_jpeg": jpeg,
            "variations": [list(png_size(base64.b64decode(d.b64_json))) for d in varied.data],
            "variation_jpeg": base64.b64decode(varied_jpeg.data[0].b64_json)[:3] == b"\xff\xd8\xff"}


def stream(client: "openai.OpenAI", size: str) -> list:
    events = client.images.generate(prompt="a yellow circle", size=size, stream=True, partial_images=2,
                                    extra_body={"seed": 6, "num_inference_steps": 6})
    seen = []
    for event in events:
        image = base64.b64decode(event.b64_json)
        seen.append({"type": event.type, "index": getattr(event, "partial_image_index", None), "size": list(png_size(image))})
    return seen


if __name__ == "__main__":
    main()
