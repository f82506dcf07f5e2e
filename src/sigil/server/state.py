"""Typed application state keys (``web.AppKey``)."""

from __future__ import annotations

import asyncio

from aiohttp import web

from sigil.config import Config
from sigil.mirror import Mirror
from sigil.routing import Router

CONFIG = web.AppKey("config", Config)
MIRROR = web.AppKey("mirror", Mirror)
ROUTER = web.AppKey("router", Router)
READY = web.AppKey("ready", asyncio.Event)
