#!/usr/bin/env python3
"""A raw Python `websockets` client of wsgate, for the interop test.

Usage: py_client.py URL CHANNEL COUNT
Environment: WSGATE_TOKEN (the JWT), WSGATE_CA (the CA file to trust).

Connects with the subprotocol carrier (wsgate.v1 + bearer.<jwt>), subscribes
to CHANNEL, prints {"event":"subscribed"}, publishes once as soon as it has
received the first message of the channel (so that every subscriber is in
place before anyone publishes), and exits after COUNT messages. Every frame
received is printed as one JSON line: {"event":"frame","frame":{...}}.
"""
import asyncio
import json
import os
import ssl
import sys

from websockets.asyncio.client import connect


def emit(obj):
    print(json.dumps(obj), flush=True)


async def main(url, channel, count):
    token = os.environ["WSGATE_TOKEN"]
    ctx = ssl.create_default_context(cafile=os.environ["WSGATE_CA"])
    async with connect(
        url,
        ssl=ctx,
        subprotocols=["wsgate.v1", "bearer." + token],
        compression=None,
        open_timeout=10,
    ) as ws:
        emit({"event": "open", "subprotocol": ws.subprotocol})
        await ws.send(json.dumps({"op": "subscribe", "id": 1, "channel": channel}))
        published = False
        messages = 0
        while messages < count:
            frame = json.loads(await ws.recv())
            emit({"event": "frame", "frame": frame})
            op = frame.get("op")
            if op == "ok" and frame.get("id") == 1:
                emit({"event": "subscribed"})
            elif op == "error":
                raise SystemExit(f"error frame: {frame}")
            elif op == "message" and frame.get("channel") == channel:
                messages += 1
                if not published:
                    published = True
                    await ws.send(json.dumps({
                        "op": "publish", "id": 2, "channel": channel,
                        "data": {"text": "hello from python"},
                    }))
        emit({"event": "done"})


if __name__ == "__main__":
    url, channel, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    asyncio.run(asyncio.wait_for(main(url, channel, count), timeout=20))
