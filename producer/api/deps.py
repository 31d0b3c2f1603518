"""Request dependencies: the app state, the event hub and the caller's API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader

from common.apikeys import ApiKey
from producer.api.state import AppState
from producer.hub import Hub

#: Where ``RequestLimits`` leaves the key it authenticated, in the request's scope state.
KEY_STATE = "sdq_key"


# Both dependencies are async on purpose: a sync one costs a thread-pool hop per request.
async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.sdq
    return state


State = Annotated[AppState, Depends(get_state)]


async def get_hub(request: Request) -> Hub:
    hub: Hub = request.app.state.hub
    return hub


EventHub = Annotated[Hub, Depends(get_hub)]


#: The spec's security scheme (Swagger's Authorize button): Hotpot's bare key in
#: ``Authorization``. It only reads the header; ``authenticate`` judges it.
API_KEY = APIKeyHeader(
    name="Authorization",
    scheme_name="ApiKey",
    description="Your API key, bare as Hotpot sends it (`Authorization: sdq_...`); "
    "`Bearer sdq_...` is accepted too.",
    auto_error=False,
)


async def authenticate(
    request: Request,
    state: State,
    authorization: Annotated[str | None, Security(API_KEY)] = None,
) -> ApiKey:
    """The key in the Authorization header: 401 when missing, 403 when unknown, 429 over its
    request rate.

    ``RequestLimits`` authenticated it before the body was read (a route that uses this
    dependency is one it authenticates), so a request is checked and rate-limited once; the
    lookup here serves only an app mounted without that middleware."""
    key = request.scope.get("state", {}).get(KEY_STATE)
    if isinstance(key, ApiKey):
        return key
    return await state.auth.authenticate(authorization)


Key = Annotated[ApiKey, Depends(authenticate)]
