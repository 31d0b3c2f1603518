"""Request dependencies: the app state and the caller's API key."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Request

from common.keys import ApiKey
from producer.api.state import AppState


# Both dependencies are async on purpose: a sync one costs a thread-pool hop per request.
async def get_state(request: Request) -> AppState:
    state: AppState = request.app.state.sdq
    return state


State = Annotated[AppState, Depends(get_state)]


async def authenticate(
    state: State,
    authorization: Annotated[
        str | None,
        Header(description="Your API key, bare as Hotpot sends it, or as `Bearer <key>`."),
    ] = None,
) -> ApiKey:
    """The key in the Authorization header: 401 when missing, 403 when unknown."""
    return await state.auth.authenticate(authorization)


Key = Annotated[ApiKey, Depends(authenticate)]
