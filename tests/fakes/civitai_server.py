"""A fake CivitAI on 127.0.0.1 that speaks the real shapes and misbehaves on request.

- `GET /api/v1/models/{id}`: model JSON (`type`, `nsfw`, `tags`, HTML
  `description`, `modelVersions[]` newest first).
- `GET /api/v1/model-versions/{id}` and `/by-hash/{sha256}`: version JSON
  (`modelId`, `baseModel`, `baseModelType`, `trainedWords`, `air`, `model{}`,
  `files[]` with `sizeKB`, `metadata.format`, `hashes.SHA256`, `downloadUrl`,
  `primary`; `images[]` with `nsfwLevel`).
- `GET /api/v1/images?imageId={id}&withMeta=true`: `{"items": [...], "metadata": {...}}`,
  each image with `url`, `nsfw`, `nsfwLevel` ("None"/"Soft"/"Mature"/"X"), `browsingLevel`,
  `baseModel`, `modelVersionIds` and its published generation data, `meta` (`prompt`,
  `negativePrompt`, `steps`, `sampler`, `cfgScale`, `seed`, `Size`, `Model`, `Model hash`,
  `resources`, `civitaiResources`); an unknown id lists no items (CivitAI answers 200). A test
  may set an image to any body at all (`raw_images`), or a redirect (`image_redirects`).
- `GET /api/download/models/{versionId}`: 307 to a "presigned" storage URL;
  401 JSON for gated versions without the right `Authorization: Bearer`.
- `GET /storage/{key}?X-Amz-Signature=…`: the bytes, with `Content-Disposition`,
  `Accept-Ranges` and `Range`; like S3, a request that also carries an
  `Authorization` header is refused (400).
- `GET /files/{name}`: a plain file host (what a Discord attachment URL is).

Faults are queued per path fragment and used one request each: a status (with
`Retry-After`), a dropped connection after N body bytes, wrong bytes, an HTML
login page. Every request is recorded (path, query, headers) for assertions.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, quote, urlsplit

from tests.fakes.hf_server import QuietServer


@dataclass
class Fault:
    match: str
    kind: str  # "status" | "drop" | "corrupt" | "html"
    status: int = 500
    retry_after: str | None = None
    at: int = 0  # drop: body bytes sent before the connection is cut


@dataclass
class Recorded:
    path: str
    query: str
    headers: dict[str, str]


class FakeCivitai:
    def __init__(self):
        self.models: dict[int, dict] = {}
        self.versions: dict[int, dict] = {}
        self.blobs: dict[str, tuple[bytes, str]] = {}  # storage key -> (bytes, file name)
        self.files: dict[str, bytes] = {}  # /files/<name>
        self.version_blobs: dict[int, str] = {}  # version id -> storage key
        self.gated: set[int] = set()
        self.images: dict[int, dict] = {}
        self.raw_images: dict[int, bytes] = {}  # image id -> the whole answer, as sent
        self.image_redirects: dict[int, str] = {}  # image id -> Location
        self.token = "civitai-secret-token"
        self.requests: list[Recorded] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._server = QuietServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    @property
    def base(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeCivitai":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # -- content

    def add_model(
        self,
        model_id: int,
        version_id: int,
        data: bytes,
        *,
        name: str = "Detail Tweaker XL",
        version_name: str = "v1.0",
        type: str = "LORA",
        base_model: str = "SDXL 1.0",
        base_model_type: str = "Standard",
        file_name: str = "detail_tweaker_xl.safetensors",
        file_format: str = "SafeTensor",
        trained_words: list[str] | None = None,
        nsfw: bool = False,
        image_levels: tuple[int, ...] = (1,),
        tags: list[str] | None = None,
        gated: bool = False,
        sha256: str | None = None,
        extra_files: list[dict] | None = None,
    ) -> dict:
        """One model with one more version (newest first); returns the version JSON."""
        key = f"{version_id}-{hashlib.sha1(data).hexdigest()[:8]}"
        self.blobs[key] = (data, file_name)
        download = f"https://civitai.com/api/download/models/{version_id}?type=Model&format={file_format}"
        file = {
            "id": version_id * 10,
            "sizeKB": len(data) / 1024,
            "name": file_name,
            "type": "Model",
            "pickleScanResult": "Success",
            "virusScanResult": "Success",
            "metadata": {"format": file_format, "size": "pruned", "fp": "fp16"},
            "hashes": {
                "AutoV2": hashlib.sha256(data).hexdigest()[:10].upper(),
                "SHA256": (sha256 or hashlib.sha256(data).hexdigest()).upper(),
                "CRC32": "0BADF00D",
            },
            "primary": True,
            "downloadUrl": download,
        }
        images = [
            {"url": f"https://image.civitai.com/x/{version_id}-{i}.jpeg", "nsfwLevel": level,
             "width": 832, "height": 1216, "hash": "U00000", "type": "image"}
            for i, level in enumerate(image_levels)
        ]
        ecosystem = "sdxl" if base_model.lower().startswith(("sdxl", "pony", "illustrious", "noobai")) else "sd1"
        version = {
            "id": version_id,
            "modelId": model_id,
            "name": version_name,
            "baseModel": base_model,
            "baseModelType": base_model_type,
            "air": f"urn:air:{ecosystem}:{type.lower()}:civitai:{model_id}@{version_id}",
            "status": "Published",
            "availability": "EarlyAccess" if gated else "Public",
            "nsfwLevel": max(image_levels or (1,)),
            "createdAt": "2025-01-01T00:00:00.000Z",
            "trainedWords": trained_words if trained_words is not None else ["detailed", "sharp focus"],
            "stats": {"downloadCount": 1234, "thumbsUpCount": 99},
            "model": {"name": name, "type": type, "nsfw": nsfw, "poi": False},
            "files": [*(extra_files or []), file],
            "images": images,
            "downloadUrl": download,
        }
        self.versions[version_id] = version
        model = self.models.setdefault(model_id, {
            "id": model_id, "name": name, "description": "<p>Adds <b>detail</b> &amp; sharpness.</p>",
            "type": type, "poi": False, "nsfw": nsfw, "allowNoCredit": True, "tags": tags or ["detail", "style"],
            "creator": {"username": "someone"}, "stats": {"downloadCount": 1234}, "modelVersions": [],
        })
        embedded = {k: v for k, v in version.items() if k not in ("model", "modelId")}
        model["modelVersions"].insert(0, embedded)
        if gated:
            self.gated.add(version_id)
        self.version_blobs[version_id] = key
        return version

    def add_image(self, image_id: int, meta: dict | None, *, nsfw_level: str = "None", base_model: str = "Illustrious",
                  version_ids: list[int] | None = None) -> dict:
        """One published image (`meta` None: its maker hid the generation data); returns its item."""
        levels = {"None": 1, "Soft": 2, "Mature": 4, "X": 8}
        item = {
            "id": image_id, "url": f"https://image.civitai.com/x/{image_id}/original=true/{image_id}.jpeg",
            "hash": "U00000", "width": 832, "height": 1216, "type": "image", "nsfw": nsfw_level != "None",
            "nsfwLevel": nsfw_level, "browsingLevel": levels[nsfw_level], "createdAt": "2025-04-17T21:28:57.225Z",
            "postId": image_id // 10, "username": "someone", "baseModel": base_model,
            "modelVersionIds": version_ids or [],
            "stats": {"cryCount": 0, "laughCount": 0, "likeCount": 12, "dislikeCount": 0, "heartCount": 3,
                      "commentCount": 0},
            "meta": meta,
        }
        self.images[image_id] = item
        return item

    def fault(self, match: str, kind: str = "status", **kwargs) -> None:
        with self._lock:
            self._faults.append(Fault(match, kind, **kwargs))

    def take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for index, fault in enumerate(self._faults):
                if fault.match in path:
                    return self._faults.pop(index)
        return None

    def hits(self, fragment: str) -> list[Recorded]:
        return [r for r in self.requests if fragment in r.path]


def _handler(fake: FakeCivitai):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet test output
            pass

        def do_GET(self):
            parts = urlsplit(self.path)
            fake.requests.append(Recorded(parts.path, parts.query, {k.lower(): v for k, v in self.headers.items()}))
            fault = fake.take_fault(parts.path)
            if fault and fault.kind == "status":
                headers = {"Retry-After": fault.retry_after} if fault.retry_after is not None else {}
                return self._json(fault.status, {"error": f"fault {fault.status}"}, headers)
            if fault and fault.kind == "html":
                return self._send(200, b"<html><body>Please log in</body></html>", {"Content-Type": "text/html"})
            path = parts.path
            if path == "/api/v1/images":
                return self._images(parse_qs(parts.query))
            if m := re.fullmatch(r"/api/v1/models/(\d+)", path):
                model = fake.models.get(int(m.group(1)))
                return self._json(200, model) if model else self._json(404, {"error": "No model with id"})
            if m := re.fullmatch(r"/api/v1/model-versions/by-hash/([0-9A-Fa-f]+)", path):
                wanted = m.group(1).upper()
                for version in fake.versions.values():
                    if any(f["hashes"].get("SHA256") == wanted for f in version["files"]):
                        return self._json(200, version)
                return self._json(404, {"error": "Model not found"})
            if m := re.fullmatch(r"/api/v1/model-versions/(\d+)", path):
                version = fake.versions.get(int(m.group(1)))
                return self._json(200, version) if version else self._json(404, {"error": "Model not found"})
            if m := re.fullmatch(r"/api/download/models/(\d+)", path):
                version_id = int(m.group(1))
                key = fake.version_blobs.get(version_id)
                if key is None:
                    return self._json(404, {"error": "Model not found"})
                if version_id in fake.gated and self.headers.get("Authorization") != f"Bearer {fake.token}":
                    return self._json(401, {"error": "Unauthorized", "message": "The creator of this asset requires you to be logged in to download it"})
                location = f"{fake.base}/storage/{key}?X-Amz-Signature=deadbeef&X-Amz-Expires=86400"
                return self._send(307, b"", {"Location": location})
            if m := re.fullmatch(r"/storage/([\w-]+)", path):
                if "authorization" in {k.lower() for k in self.headers.keys()}:
                    return self._send(400, b"<Error>Only one auth mechanism allowed</Error>", {"Content-Type": "application/xml"})
                if "X-Amz-Signature" not in parts.query or m.group(1) not in fake.blobs:
                    return self._send(403, b"<Error>AccessDenied</Error>", {"Content-Type": "application/xml"})
                data, name = fake.blobs[m.group(1)]
                return self._file(data, name, fault)
            if m := re.fullmatch(r"/files/([\w.-]+)", path):
                data = fake.files.get(m.group(1))
                if data is None:
                    return self._send(404, b"not found", {})
                return self._file(data, m.group(1), fault)
            return self._json(404, {"error": "no route"})

        def _images(self, query: dict[str, list[str]]):
            wanted = int((query.get("imageId") or ["0"])[0] or 0)
            if wanted in fake.image_redirects:
                return self._send(302, b"", {"Location": fake.image_redirects[wanted]})
            if wanted in fake.raw_images:
                return self._send(200, fake.raw_images[wanted], {"Content-Type": "application/json"})
            with_meta = (query.get("withMeta") or ["false"])[0] == "true"
            items = [item if with_meta else {k: v for k, v in item.items() if k != "meta"}
                     for item in [fake.images.get(wanted)] if item is not None]
            return self._json(200, {"items": items, "metadata": {"pageSize": 100, "currentPage": 1}})

        def _file(self, data: bytes, name: str, fault: Fault | None):
            if fault and fault.kind == "corrupt":
                data = bytes(b ^ 0xFF for b in data[:16]) + data[16:]
            start, status, headers = 0, 200, {}
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if match and int(match.group(1)) < len(data):
                start, status = int(match.group(1)), 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            headers.update({
                "Content-Type": "application/octet-stream",
                "Accept-Ranges": "bytes",
                # An ASCII fallback beside the RFC 5987 name, as real storage sends (headers are Latin-1).
                "Content-Disposition": f"attachment; filename=\"{name.encode('ascii', 'replace').decode()}\"; "
                                       f"filename*=UTF-8''{quote(name)}",
            })
            body = data[start:]
            if fault and fault.kind == "drop":
                self.send_response(status)
                for key, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body[: fault.at])
                self.wfile.flush()
                self.close_connection = True
                return
            return self._send(status, body, headers)

        def _json(self, status: int, body, headers=None):
            return self._send(status, json.dumps(body).encode(), {"Content-Type": "application/json; charset=utf-8", **(headers or {})})

        def _send(self, status: int, body: bytes, headers: dict[str, str]):
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def query_of(recorded: Recorded) -> dict[str, list[str]]:
    return parse_qs(recorded.query)
