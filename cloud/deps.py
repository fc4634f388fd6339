"""FastAPI dependencies: the services, the authenticated device, and the JSON error shape."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.responses import JSONResponse

from cloud.keys import token_device_name, token_matches
from cloud.services import Services
from cloud.storage import Device, Storage


class ApiError(Exception):
    """An error answered as ``{"error": code, "detail": sentence}`` with ``status``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers


def api_error_response(exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.code, "detail": exc.detail}, status_code=exc.status, headers=exc.headers)


def get_services(request: Request) -> Services:
    return request.app.state.services


def get_storage(services: Annotated[Services, Depends(get_services)]) -> Storage:
    return services.storage


def current_device(storage: Annotated[Storage, Depends(get_storage)],
                   authorization: Annotated[str | None, Header()] = None) -> Device:
    unauthorised = ApiError(401, "unauthorised", "a valid 'Authorization: Bearer <device token>' is required",
                            {"WWW-Authenticate": "Bearer"})
    if not authorization or not authorization.lower().startswith("bearer "):
        raise unauthorised
    token = authorization[7:].strip()
    name = token_device_name(token)
    device = storage.device_by_name(name) if name else None
    # compare in constant time even for unknown names, so timing tells nothing about which exist
    stored = device.token_sha256 if device else "0" * 64
    if not token_matches(token, stored) or device is None:
        raise unauthorised
    return device


ServicesDep = Annotated[Services, Depends(get_services)]
StorageDep = Annotated[Storage, Depends(get_storage)]
DeviceDep = Annotated[Device, Depends(current_device)]
