"""Floor: the register endpoint on the bare stack (FastAPI, redis-py, aio-pika), no Courier code.

``POST /v1/users`` validates the same JSON body with a pydantic model, writes the user with one
Redis ``HSET`` and publishes ``user.registered`` persistent, mandatory, with an awaited
publisher confirm, then answers 201 with the user. It is served by uvicorn with the settings
Courier uses (uvloop and httptools when installed, no access log), so the difference to
user-service is Courier's own code and nothing else.

Run by ``bench/run.py``; ``GET /readyz`` answers 200 once Redis and the broker are connected.
"""

from __future__ import annotations

import argparse
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime

import aio_pika
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel, Field
from redis.asyncio import BlockingConnectionPool, Redis

EXCHANGE = "bench.floor"
QUEUE = "bench.floor.register"


class Register(BaseModel):
    email: str = Field(min_length=3, max_length=320)
    display_name: str = Field(min_length=1, max_length=200)
    locale: str = "en"
    channels: list[str] = Field(default_factory=lambda: ["email"])


def create_app(amqp_url: str, redis_url: str, prefix: str) -> FastAPI:
    state: dict[str, object] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        redis = Redis(
            connection_pool=BlockingConnectionPool.from_url(redis_url, max_connections=64)
        )
        connection = await aio_pika.connect_robust(amqp_url)
        channel = await connection.channel(publisher_confirms=True, on_return_raises=True)
        exchange = await channel.declare_exchange(
            EXCHANGE, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(
            QUEUE, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, routing_key="user.*")
        state.update(redis=redis, exchange=exchange, channel=channel, queue=queue)
        try:
            yield
        finally:
            await connection.close()
            await redis.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get("/readyz")
    async def readyz() -> dict[str, bool]:
        return {"ready": "exchange" in state}

    @app.post("/v1/users", status_code=201)
    async def register(body: Register) -> dict[str, object]:
        redis = state["redis"]
        exchange = state["exchange"]
        assert isinstance(redis, Redis)
        assert isinstance(exchange, aio_pika.abc.AbstractExchange)
        user_id = str(uuid.uuid4())
        now = datetime.now(UTC).isoformat()
        user = {"id": user_id, **body.model_dump(), "created_at": now}
        await redis.hset(
            f"{prefix}floor-user:{user_id}",
            mapping={
                "email": body.email,
                "display_name": body.display_name,
                "locale": body.locale,
                "channels": ",".join(body.channels),
                "created_at": now,
            },
        )
        event_id = str(uuid.uuid4())
        event = {"id": event_id, "type": "user.registered", "time": now, "data": user}
        await exchange.publish(
            aio_pika.Message(
                json.dumps(event).encode(),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=event_id,
            ),
            routing_key="user.registered",
            mandatory=True,
        )
        return user

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--amqp-url", required=True)
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.amqp_url, args.redis_url, args.prefix),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
