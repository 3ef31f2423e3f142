"""The conventional buffering proxy: the same as streaming_proxy.py, but it reads the whole
upstream body before answering (what a proxy that inspects or rewrites responses does).
``UPSTREAM=http://127.0.0.1:P python buffering_proxy.py --port N``

Fair settings, not a strawman: one shared client, a pool as large as the bench needs (httpx's
default of 100 connections would queue the 200- and 2,000-stream runs), the same timeouts as
trioproxy (10 s connect, 600 s per read), hop-by-hop headers dropped both ways.
"""

import argparse
import contextlib
import os

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

UPSTREAM = os.environ.get("UPSTREAM", "http://127.0.0.1:9000")
HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
       "upgrade", "host", "content-length", "date", "server"}


def clean(headers):
    return {k: v for k, v in headers.items() if k.lower() not in HOP}


@contextlib.asynccontextmanager
async def lifespan(app):
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=4096)
    timeout = httpx.Timeout(600.0, connect=10.0, write=60.0, pool=30.0)
    async with httpx.AsyncClient(base_url=UPSTREAM, limits=limits, timeout=timeout) as client:
        app.state.client = client
        yield


async def proxy(request: Request):
    client: httpx.AsyncClient = request.app.state.client
    url = httpx.URL(path=request.url.path, query=request.url.query.encode("latin-1"))
    req = client.build_request(request.method, url, headers=clean(request.headers),
                               content=await request.body())
    resp = await client.send(req)  # reads the whole body
    headers = {k: v for k, v in clean(resp.headers).items() if k.lower() != "content-encoding"}
    return Response(resp.content, status_code=resp.status_code, headers=headers)


METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]
app = Starlette(routes=[Route("/{path:path}", proxy, methods=METHODS)], lifespan=lifespan)

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
