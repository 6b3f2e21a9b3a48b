"""Request dependencies, as ``Annotated`` aliases (FastAPI's recommended form).

They are ``async def`` so FastAPI calls them on the event loop; a plain ``def`` dependency
runs in the thread pool, two thread hops per request for an attribute read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from user_service.config import Settings
from user_service.store import UserStore


async def get_store(request: Request) -> UserStore:
    store: UserStore = request.app.state.store
    return store


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


StoreDep = Annotated[UserStore, Depends(get_store)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
