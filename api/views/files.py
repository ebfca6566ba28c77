"""Uploaded input files."""
from __future__ import annotations

from flask import Blueprint, jsonify, request
from flask_jwt_extended import jwt_required

from api.auth import me
from api.db import db
from api.openapi import api_doc
from api.schemas import FileOut
from marketplace.files import service as files
from marketplace.infra.errors import InvalidInput

bp = Blueprint("files", __name__, url_prefix="/v1/files")


@bp.post("")
@api_doc(summary="Upload an input file (multipart field `file`); reference it in tasks as {\"file\": id}",
         form={"file": "binary"}, responses={201: FileOut}, tags=["files"])
@jwt_required()
def upload():  # type: ignore[no-untyped-def]
    user = me()
    upload = request.files.get("file")
    if upload is None:
        raise InvalidInput.field("file", "a multipart/form-data field named `file` is required")
    session = db()
    row = files.store_file(session, user_id=user.id, data=upload.read(), filename=upload.filename,
                           content_type=upload.mimetype)
    session.commit()
    resp = jsonify(files.file_document(row))
    resp.status_code = 201
    resp.headers["Location"] = f"/v1/files/{row.id}"
    return resp


@bp.get("/<file_id>")
@api_doc(summary="An uploaded file's metadata (owner only)", responses={200: FileOut}, tags=["files"])
@jwt_required()
def get(file_id: str):  # type: ignore[no-untyped-def]
    return jsonify(files.file_document(files.get_file(db(), file_id=file_id, user=me())))
