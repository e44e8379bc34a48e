"""``mcpguard sidecar``: load settings, assemble the sidecar, serve it with uvicorn until told to stop."""

from __future__ import annotations

import argparse
import gc
import math
import os
import signal
import sys
from collections.abc import Mapping
from datetime import timedelta
from typing import TypeAlias

import uvicorn

from mcpguard import (
    AssertionSigner,
    AuditStore,
    BuiltInAuthorizationServer,
    ClientMetadataFetcher,
    ExportingAuditStore,
    KeyRing,
    LocalUsers,
    RateLimits,
    Store,
    Telemetry,
    configure_telemetry,
    open_audit_store,
    open_store,
)
from sidecar.app import Closer, SidecarApp, build_sidecar, build_stdio_sidecar
from sidecar.coalescing import CoalescingHttpToolsProtocol
from sidecar.hashing import hasher_from_env
from sidecar.proxy import ProxySettings
from sidecar.settings import SidecarSettings, load_settings
from sidecar.stdio_upstream import StdioSettings

__all__ = ["add_sidecar_command", "serve_until_stopped", "sidecar_from_settings"]

_Commands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"
_SERVICE_NAME = "mcpguard"
_YOUNG_GENERATION_THRESHOLD = 10_000


def sidecar_from_settings(
    settings: SidecarSettings, env: Mapping[str, str], *, telemetry: Telemetry | None = None
) -> SidecarApp:
    """The sidecar app described by ``settings`` (credentials for the upstream resolved from ``env``).

    Spans, metrics and (with ``audit_otel_logs``) audit logs go to ``telemetry`` when it is given, else to
    the OTLP collector at ``otlp_endpoint``. With ``oauth``, the built-in authorization server keeps its
    clients, codes, grants and users in the state store.
    """
    if telemetry is None:
        telemetry = configure_telemetry(
            service_name=_SERVICE_NAME, otlp_endpoint=settings.otlp_endpoint, logs=settings.audit_otel_logs
        )
    store = open_store(settings.state_url)
    oauth, on_shutdown = _authorization_server(settings, store, env)
    if settings.upstream_cmd is not None:
        stdio = StdioSettings(
            argv=settings.upstream_argv,
            env=dict(settings.stdio_env),
            cwd=settings.stdio_cwd,
            temp_root=settings.stdio_temp_root,
            max_sessions=settings.stdio_max_sessions,
            idle_timeout=settings.stdio_idle_timeout,
            read_timeout=settings.upstream_timeout,
            max_message_bytes=settings.max_response_bytes,
        )
        return build_stdio_sidecar(
            config=settings.guard_config(),
            stdio=stdio,
            store=store,
            keys=KeyRing(store=store, hasher=hasher_from_env(env)),
            oauth=oauth,
            annotations_ttl=settings.annotations_ttl,
            rate_limits=RateLimits(per_tenant=f"{settings.rate_limit_per_min}/minute"),
            audit=_audit_store(settings, telemetry),
            audit_retention=timedelta(days=settings.audit_retention_days),
            telemetry=telemetry,
            on_shutdown=on_shutdown,
        )
    drop = frozenset({settings.api_key_header}) if settings.api_key_header else frozenset()
    proxy = ProxySettings(
        upstream=settings.upstream or "",
        inject_headers=dict(settings.upstream_headers) | settings.upstream_credentials(env),
        drop_headers=drop,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.upstream_timeout,
        max_response_bytes=settings.max_response_bytes,
        client="aiohttp" if settings.upstream_client == "aiohttp" else "pool",
    )
    key = settings.assertion_key(env)
    assertions = None
    if key is not None:
        assertions = AssertionSigner(
            key=key, issuer=settings.public_origin, audience=proxy.upstream, lifetime=settings.assertion_lifetime
        )
    return build_sidecar(
        config=settings.guard_config(),
        assertions=assertions,
        proxy=proxy,
        store=store,
        keys=KeyRing(store=store, hasher=hasher_from_env(env)),
        oauth=oauth,
        annotations_ttl=settings.annotations_ttl,
        rate_limits=RateLimits(per_tenant=f"{settings.rate_limit_per_min}/minute"),
        audit=_audit_store(settings, telemetry),
        audit_retention=timedelta(days=settings.audit_retention_days),
        telemetry=telemetry,
        on_shutdown=on_shutdown,
    )


def _authorization_server(
    settings: SidecarSettings, store: Store, env: Mapping[str, str]
) -> tuple[BuiltInAuthorizationServer | None, tuple[Closer, ...]]:
    """The built-in authorization server ``settings`` ask for (or ``None``), and what to close at shutdown."""
    if not settings.oauth:
        return None, ()
    oauth_settings = settings.oauth_settings(env)
    keys = settings.oauth_signing_key(env)
    documents = None
    if settings.oauth_client_metadata_documents:
        # Private addresses stay unreachable unless the operator accepts that risk (tests, closed networks).
        documents = ClientMetadataFetcher(allow_private=settings.oauth_cimd_allow_private)
    oauth = BuiltInAuthorizationServer(
        oauth_settings,
        store=store,
        keys=keys,
        authenticator=LocalUsers(store, hasher=hasher_from_env(env)),
        documents=documents,
    )
    return oauth, (documents.close,) if documents is not None else ()


def _audit_store(settings: SidecarSettings, telemetry: Telemetry | None) -> AuditStore:
    audit = open_audit_store(settings.audit_url)
    if settings.audit_otel_logs and telemetry is not None:
        return ExportingAuditStore(audit, logger_provider=telemetry.logger_provider)
    return audit


async def serve_until_stopped(server: uvicorn.Server) -> None:
    """Serve until SIGTERM/SIGINT, drain, and return normally so callers can clean up and exit 0."""
    # uvicorn re-raises the stop signal once drained, under the handlers it found: make those no-ops.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    # What is alive now (modules, the mcp SDK's and pydantic's schemas, the assembled stack) lives as long as
    # the process: kept out of the collector's generations, a full collection no longer walks it, which had
    # stalled every request for tens of milliseconds at a time under load. Garbage goes first, or it would stay.
    gc.collect()
    gc.freeze()
    # A call leaves no reference cycles (the proxy tests check), so the young generation only holds calls in
    # flight: collecting it every 700 allocations, the default, cost a loaded sidecar about 2% of its time.
    gc.set_threshold(_YOUNG_GENERATION_THRESHOLD, *gc.get_threshold()[1:])
    try:
        await server.serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


async def _run(args: argparse.Namespace) -> int:
    overrides = {
        "upstream": args.upstream,
        "upstream_cmd": args.upstream_cmd,
        "listen": args.listen,
        "public_url": args.public_url,
        "state": getattr(args, "state", None),
    }
    settings = load_settings(config_file=args.config, env=os.environ, overrides=overrides)
    app = sidecar_from_settings(settings, os.environ)
    config = uvicorn.Config(
        app,
        host=settings.listen_host,
        port=settings.listen_port,
        http=CoalescingHttpToolsProtocol,
        lifespan="on",
        access_log=False,
        proxy_headers=False,
        server_header=False,
        date_header=False,
        # uvicorn reads None as no limit at all: 0 must mean not waiting, and 1.5 at least 1.5 s, not 1.
        timeout_graceful_shutdown=math.ceil(settings.drain_seconds),
    )
    server = uvicorn.Server(config)
    # Only a command's executable is shown: its arguments may hold credentials.
    target = settings.upstream or f"{settings.upstream_argv[0]} (stdio, one process per session)"
    print(f"mcpguard sidecar: {settings.public_origin}{settings.mcp_path} -> {target}", file=sys.stderr)
    if settings.oauth:
        print(f"mcpguard sidecar: OAuth authorization server, issuer {settings.public_origin}", file=sys.stderr)
    await serve_until_stopped(server)
    return 0


def add_sidecar_command(commands: _Commands, common: argparse.ArgumentParser) -> None:
    """Register ``mcpguard sidecar``."""
    sidecar = commands.add_parser(
        "sidecar",
        parents=[common],
        help="run the guard as a reverse proxy in front of an MCP server",
        description="Settings come from flags, then MCPGUARD_* variables, then --config TOML, then defaults.",
    )
    sidecar.add_argument("--upstream", metavar="URL", help="the upstream MCP endpoint, e.g. http://127.0.0.1:9000/mcp")
    sidecar.add_argument("--upstream-cmd", metavar="COMMAND", help="a stdio MCP server command (one per session)")
    sidecar.add_argument("--listen", metavar="HOST:PORT", help="where to listen (default 127.0.0.1:8080)")
    sidecar.add_argument("--public-url", metavar="URL", help="the origin clients use (default from --listen)")
    sidecar.add_argument("--config", metavar="FILE", help="a TOML file of settings")
    sidecar.set_defaults(run=_run)
