"""Reading request bodies within the size limit, and splitting multipart uploads into images."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import ClientDisconnect

from service.errors import (
    ClientClosedRequest,
    InvalidRequest,
    PayloadTooLarge,
    UnsupportedMediaType,
)

# Raw bodies are recognised by their bytes; these types are taken to mean "some bytes". curl's
# --data-binary sends application/x-www-form-urlencoded unless told otherwise.
RAW_TYPES = ("image/", "application/octet-stream", "application/x-www-form-urlencoded")


@dataclass(frozen=True)
class Upload:
    filename: str | None
    data: bytes


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing (413) as soon as it passes ``limit`` bytes, before buffering it.
    (A body that does not arrive in time is the connection protocol's business: service.http.)"""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise PayloadTooLarge(f"request body of {declared} bytes exceeds {limit} bytes")
        except ValueError:
            raise InvalidRequest("malformed Content-Length header") from None
    chunks = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"request body exceeds {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientClosedRequest("the client disconnected before sending the whole body") from None
    return b"".join(chunks)


async def read_images(request: Request, limit: int, max_images: int) -> list[Upload]:
    """One raw image body, or the ``file`` fields of a multipart form, in request order."""
    content_type = request.headers.get("content-type", "application/octet-stream").lower()
    body = await read_body(request, limit)
    if content_type.startswith("multipart/form-data"):
        return await _parse_multipart(request, body, max_images)
    if not content_type.startswith(RAW_TYPES):
        raise UnsupportedMediaType(
            f"Content-Type {content_type!r} is not accepted: send the image as the raw body "
            "(image/*, application/octet-stream or no Content-Type) or as multipart/form-data "
            "fields named 'file', e.g. curl --data-binary @photo.jpg "
            f"{request.url.path} or curl -F file=@photo.jpg {request.url.path}"
        )
    if not body:
        raise InvalidRequest("the request body is empty; send an image")
    return [Upload(None, body)]


async def _parse_multipart(request: Request, body: bytes, max_images: int) -> list[Upload]:
    async def stream():  # type: ignore[no-untyped-def]
        yield body

    parser = MultiPartParser(request.headers, stream(), max_files=max_images + 1,
                             max_fields=max_images + 16)
    try:
        form = await parser.parse()
    except (MultiPartException, MultipartParseError) as exc:
        raise InvalidRequest(f"malformed multipart body: {exc}") from exc
    try:
        uploads = []
        for value in form.getlist("file"):
            if isinstance(value, UploadFile):
                uploads.append(Upload(value.filename, await value.read()))
            else:  # a plain text field named file
                uploads.append(Upload(None, value.encode()))
    finally:
        await form.close()
    if not uploads:
        raise InvalidRequest("the multipart body has no field named 'file'")
    if len(uploads) > max_images:
        raise PayloadTooLarge(f"{len(uploads)} images in one request; the limit is {max_images}")
    return uploads
