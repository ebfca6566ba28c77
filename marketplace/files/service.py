"""Uploaded inputs: bytes in the object store under `inputs/<user_id>/<sha256>`, a row per upload."""
from __future__ import annotations

import mimetypes
import re
import uuid

from sqlalchemy.orm import Session
from werkzeug.utils import secure_filename

from marketplace.files.models import File
from marketplace.infra.errors import InvalidInput, NotFound
from marketplace.infra.storage import get_store, sha256_hex
from marketplace.users.models import User

_MIME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}$")


def clean_filename(name: str | None) -> str | None:
    """The base name only: directories, `..`, control and odd characters are stripped."""
    if not name:
        return None
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    cleaned = secure_filename(base)[:255]
    return cleaned or None


def clean_content_type(value: str | None, filename: str | None) -> str:
    value = (value or "").split(";", 1)[0].strip().lower()
    if _MIME.match(value) and value != "application/octet-stream":
        return value
    guessed = mimetypes.guess_type(filename)[0] if filename else None
    return guessed or "application/octet-stream"


def store_file(
    session: Session, *, user_id: uuid.UUID, data: bytes, filename: str | None = None, content_type: str | None = None
) -> File:
    """Put the bytes in the object store and record them; the caller commits."""
    if not data:
        raise InvalidInput.field("file", "the file is empty")
    name = clean_filename(filename)
    ctype = clean_content_type(content_type, name)
    digest = sha256_hex(data)
    key = f"inputs/{user_id}/{digest}"
    get_store().put_bytes(key, data, ctype)  # content-addressed: a re-upload overwrites identical bytes
    row = File(id=uuid.uuid4(), user_id=user_id, key=key, filename=name, size=len(data), sha256=digest,
               content_type=ctype)
    session.add(row)
    session.flush()
    return row


def get_file(session: Session, *, file_id: uuid.UUID | str, user: User) -> File:
    """The caller's own file; anyone else's is NotFound (admins included: inputs are private)."""
    try:
        fid = uuid.UUID(str(file_id))
    except ValueError as exc:
        raise NotFound(f"file {file_id} not found") from exc
    row = session.get(File, fid)
    if row is None or row.user_id != user.id:
        raise NotFound(f"file {file_id} not found")
    return row


def file_document(row: File) -> dict[str, object]:
    return {"id": str(row.id), "size": row.size, "sha256": row.sha256, "content_type": row.content_type,
            "filename": row.filename, "created_at": row.created_at.isoformat()}
