"""TODO(rest): being written."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["e2b"], include_in_schema=True)
