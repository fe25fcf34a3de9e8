"""The HTTP gateway: REST + SSE, OpenAI-compatible ``/v1``, health (see ``app.create_app``).

FastAPI and uvicorn are the ``gateway`` extra; this package imports them only in its submodules,
so ``mlbridge.gateway.runtime_file`` works without them.
"""
