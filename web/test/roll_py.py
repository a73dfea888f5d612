#!/usr/bin/env python3
"""Clients for the rolling-restart test (tests/it/haproxy.rs): N raw Python
`websockets` clients subscribe to one channel through the load balancer,
remember their last position (epoch, seq), reconnect after a close and
resubscribe with `since`, and stop at a message whose data is
{"end": true}. Prints one JSON line per client:
{"client", "seqs": [...], "reconnects", "unrecovered": [...]}.

Usage: roll_py.py URL CHANNEL   (stdin: one token per line, one per client)
Environment: WSGATE_CA (the CA file to trust).
"""
import asyncio
import json
import os
import ssl
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus


async def run(url, channel, token, i, ctx):
    name = f"py{i}"
    seqs, unrecovered, reconnects = [], [], 0
    position = None
    first = True
    while True:
        try:
            async with connect(
                url,
                ssl=ctx,
                additional_headers={"Authorization": f"Bearer {token}"},
                compression=None,
                open_timeout=10,
            ) as ws:
                frame = {"op": "subscribe", "id": 1, "channel": channel}
                if position:
                    frame["since"] = position
                await ws.send(json.dumps(frame))
                async for text in ws:
                    msg = json.loads(text)
                    op = msg.get("op")
                    if op == "ok" and msg.get("id") == 1:
                        if position and msg.get("recovered") is False:
                            unrecovered.append(msg.get("reason"))
                        if not (position and msg.get("recovered") is True):
                            position = {"epoch": msg["epoch"], "seq": msg["seq"]}
                        if first:
                            first = False
                            print(json.dumps({"event": "subscribed", "client": name}), flush=True)
                    elif op == "message" and msg.get("channel") == channel:
                        if position and msg["seq"] <= position["seq"]:
                            continue  # already seen
                        if position:
                            position["seq"] = msg["seq"]
                        if isinstance(msg.get("data"), dict) and msg["data"].get("end") is True:
                            return {"client": name, "seqs": seqs, "reconnects": reconnects,
                                    "unrecovered": unrecovered}
                        seqs.append(msg["seq"])
        except (ConnectionClosed, OSError, asyncio.TimeoutError, InvalidStatus, InvalidHandshake):
            # Closed (1001 from a draining replica), refused (503) or down:
            # back off briefly and resume.
            pass
        reconnects += 1
        await asyncio.sleep(0.05)


async def main(url, channel):
    tokens = [line.strip() for line in sys.stdin if line.strip()]
    ctx = ssl.create_default_context(cafile=os.environ["WSGATE_CA"])
    results = await asyncio.gather(*(run(url, channel, t, i, ctx) for i, t in enumerate(tokens)))
    for r in results:
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1], sys.argv[2]), timeout=60))
