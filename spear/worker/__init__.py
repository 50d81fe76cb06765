"""The worker SDK: serve a Python function as a warm spear worker (DESIGN.md section 5).

    # handlers.py
    def handle(data: bytes, ctx: spear.worker.Context) -> bytes:
        ctx.logger.info("got %d bytes", len(data))
        return data.upper()

    python -m spear.worker handlers:handle [--concurrency N]

The worker speaks spear.worker_protocol on its stdin and stdout; stderr is its log. Handlers
may be `async def`. This package imports only the standard library, cbor2 and
spear.worker_protocol, so a worker starts fast (docs/workers.md has the details). To serve
from your own entry point: `serve(handler, Channel.open(), concurrency=None)`.
"""

from spear.worker.channel import Channel
from spear.worker.context import Context
from spear.worker.launch import load_handler, main
from spear.worker.serve import Handler, serve

__all__ = ["Channel", "Context", "Handler", "load_handler", "main", "serve"]
