"""The FastAPI application: routers per resource, dependencies for auth and storage, a lifespan
that opens the services and starts/stops the job worker."""
from __future__ import annotations

import contextlib

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloud.deps import ApiError, api_error_response
from cloud.routers import events, health, jobs, models, rollout, uploads
from cloud.services import Services
from cloud.settings import Settings
from cloud.worker import JobRunner
from shared.wire import ErrorBody


def create_app(settings: Settings, runner: JobRunner | None = None) -> FastAPI:
    """``runner`` replaces the personalisation job (tests use a fast fake one)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        services = Services.open(settings, runner)
        app.state.services = services
        try:
            services.start()
            yield
        finally:
            services.stop()

    # every error is an ErrorBody, validation errors (422) included: the schema says so
    app = FastAPI(title="great-hmd cloud", version="1", lifespan=lifespan,
                  responses={422: {"model": ErrorBody, "description": "invalid request"}})
    for module in (health, uploads, jobs, models, events, rollout):
        app.include_router(module.router)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return api_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse({"error": code, "detail": str(exc.detail)}, status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return JSONResponse({"error": "invalid_request", "detail": f"{where}: {first.get('msg', 'invalid')}"},
                            status_code=422)

    return app

