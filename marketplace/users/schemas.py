"""Account bodies shared by every transport (REST and gRPC validate registrations alike)."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict, EmailStr, Field


class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: EmailStr
    password: str = Field(min_length=8, max_length=256)
