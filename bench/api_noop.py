"""The API app plus one authenticated no-op JSON route: the baseline for bench/api_load.py."""
from flask_jwt_extended import get_jwt_identity, jwt_required

from api import create_app

app = create_app()


@app.get("/v1/bench/noop")
@jwt_required()
def noop():  # type: ignore[no-untyped-def]
    return {"ok": True, "user": get_jwt_identity()}
