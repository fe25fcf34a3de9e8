"""The host: registry, pools, sessions, supervisor, telemetry (asyncio side of mlbridge)."""
