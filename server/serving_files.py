"""``/v1/files``: upload (multipart, as ``client.files.create`` sends it), list, retrieve,
content, delete.

An upload is checked before it is acknowledged: its size (``--max-upload-bytes``, also for a
body without a declared length), the quotas (``--max-files``, ``--max-stored-bytes``), and its
content: it must be a PDF, HTML, Markdown or plain text (detected from the bytes; the name only
tells Markdown from text), else a 400 that says what it looks like. The bytes are stored by
their sha256 and fsynced before the answer; the client's filename is a label only.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any

from fastapi import Request
from fastapi.responses import Response

from server.document_store import FileRow, StoreError
from server.errors import APIError, bad_request, retry_after
from server.protocol_vector_stores import PURPOSES, FileDeleted, FileList, FileObject

if TYPE_CHECKING:
    from server.config import ServerConfig
    from server.stores import Stores

#: the multipart parts besides the file: purpose, expires_after[anchor], expires_after[seconds]
MAX_FORM_FIELDS = 8
MAX_FIELD_BYTES = 4096
MIME = {"pdf": "application/pdf", "html": "text/html", "markdown": "text/markdown",
        "text": "text/plain"}


def file_object(row: FileRow) -> FileObject:
    return FileObject(id=row.id, bytes=row.bytes, created_at=row.created_at,
                      filename=row.filename, purpose=row.purpose, expires_at=row.expires_at)


def _store_error(e: StoreError) -> APIError:
    return APIError(e.status, str(e), param=e.param, code=e.code,
                    headers=retry_after(e.retry_seconds))


class ServingFiles:
    def __init__(self, config: ServerConfig, stores: Stores) -> None:
        self.config = config
        self.stores = stores

    async def upload(self, request: Request) -> FileObject:
        from retrieval.documents import DocumentError, sniff

        kind = request.headers.get("content-type", "")
        if not kind.lower().startswith("multipart/form-data"):
            raise APIError(415, f"Content-Type {kind!r} is not supported: upload a file as "
                                "multipart/form-data with fields 'file' and 'purpose'")
        try:
            form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS,
                                      max_part_size=MAX_FIELD_BYTES)
        except APIError:  # the body passed --max-upload-bytes while it was read
            raise
        except Exception as e:  # starlette's MultiPartException and the parser's errors
            raise bad_request(f"the multipart body could not be read: {e}", "file") from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise bad_request("the upload has no 'file' part (multipart/form-data with a "
                                  "file named 'file')", "file")
            purpose = form.get("purpose")
            if purpose not in PURPOSES:
                raise bad_request(f"purpose must be one of {', '.join(PURPOSES)} (documents "
                                  f"for vector stores), got {purpose!r}", "purpose")
            expires_at = self._expires_at(form)
            docs = self.stores.docs
            loop = asyncio.get_running_loop()
            try:
                sha, size = await loop.run_in_executor(
                    None, docs.write_blob, upload.file, self.config.max_upload_bytes)
            except StoreError as e:
                raise _store_error(e) from None
            if size == 0:
                await loop.run_in_executor(None, docs.forget_blob, sha)
                raise bad_request("the file is empty (0 bytes)", "file")
            try:
                with open(docs.blob_path(sha), "rb") as f:
                    head = f.read(1 << 20)
                kind = sniff(head, upload.filename or "")
            except DocumentError as e:
                await loop.run_in_executor(None, docs.forget_blob, sha)
                raise APIError(400, f"unsupported file: {e}", param="file",
                               code="unsupported_file") from None
            try:
                row = await loop.run_in_executor(None, lambda: docs.add_file(
                    upload.filename or "", purpose, sha, size, kind, expires_at,
                    max_files=self.config.max_files, max_bytes=self.config.max_stored_bytes))
            except StoreError as e:
                raise _store_error(e) from None
            return file_object(row)
        finally:
            await form.close()

    @staticmethod
    def _expires_at(form: Any) -> int | None:
        anchor = form.get("expires_after[anchor]")
        seconds = form.get("expires_after[seconds]")
        if anchor is None and seconds is None:
            return None
        if anchor != "created_at":
            raise bad_request("expires_after[anchor] must be 'created_at'",
                              "expires_after[anchor]")
        try:
            n = int(seconds)
        except (TypeError, ValueError):
            raise bad_request("expires_after[seconds] must be an integer",
                              "expires_after[seconds]") from None
        if not 3600 <= n <= 30 * 86400:
            raise bad_request("expires_after[seconds] must be between 3600 (1 hour) and "
                              "2592000 (30 days)", "expires_after[seconds]")
        return int(time.time()) + n

    def list(self, purpose: str | None, limit: int, order: str, after: str | None) -> FileList:
        rows = self.stores.docs.files(purpose)
        page, more = paginate(rows, limit, order, after, lambda r: r.id)
        data = [file_object(r) for r in page]
        return FileList(data=data, first_id=data[0].id if data else None,
                        last_id=data[-1].id if data else None, has_more=more)

    def retrieve(self, file_id: str) -> FileObject:
        try:
            return file_object(self.stores.docs.file(file_id))
        except StoreError as e:
            raise _store_error(e) from None

    def content(self, file_id: str) -> Response:
        from fastapi.responses import FileResponse

        try:
            row = self.stores.docs.file(file_id)
        except StoreError as e:
            raise _store_error(e) from None
        return FileResponse(self.stores.docs.blob_path(row.sha256),
                            media_type=MIME.get(row.kind or "", "application/octet-stream"),
                            filename=row.filename)

    def delete(self, file_id: str) -> FileDeleted:
        try:
            self.stores.docs.delete_file(file_id)
        except StoreError as e:
            raise _store_error(e) from None
        self.stores.changed()
        return FileDeleted(id=file_id)


def paginate(rows: list, limit: int, order: str, after: str | None, key: Any
             ) -> tuple[list, bool]:
    """OpenAI's cursor pagination over rows sorted oldest first: ``order`` asc or desc,
    ``after`` an id of the previous page (unknown: a 400)."""
    if order not in ("asc", "desc"):
        raise bad_request("order must be 'asc' or 'desc'", "order")
    if not 1 <= limit <= 10_000:
        raise bad_request("limit must be in 1..10000", "limit")
    if order == "desc":
        rows = rows[::-1]
    if after is not None:
        ids = [key(r) for r in rows]
        if after not in ids:
            raise bad_request(f"after: no object with id {after!r} in this list", "after")
        rows = rows[ids.index(after) + 1:]
    return rows[:limit], len(rows) > limit
